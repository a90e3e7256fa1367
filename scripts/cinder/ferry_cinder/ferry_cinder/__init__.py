"""ferry as the data mover of cinder-backup: see ferry_cinder.driver."""
