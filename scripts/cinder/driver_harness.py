#!/usr/bin/env python3
"""Run a cinder-backup driver the way cinder 29.0.0's backup manager runs it.

The driver class is loaded from its class path with ``importutils.import_class(
CONF.backup_driver)``, as ``BackupManager.__init__`` does, and called by the real
``BackupManager.continue_backup`` / ``BackupManager.restore_backup`` methods (cinder 29.0.0,
unmodified), so status handling, exception handling and ``_is_our_backup`` are Cinder's.
Around them only the database, message bus, attachment and key manager are fakes
(harness.py's, plus the ones below).

  driver_harness.py backup  --driver CLASS --image FILE --backup-id UUID --volume-id UUID
                            [--parent-id UUID] [--compression NAME] [--object-size BYTES]
                            [--notify-every N] [--cancel-after-notifications N]
                            [--name S] [--description S] [--volume-name S]
  driver_harness.py restore --driver CLASS --backup-id UUID --volume-id UUID --target FILE
                            [--volume-is-new] [--service NAME] [--src-volume-id UUID]
  driver_harness.py delete  --driver CLASS --backup-id UUID [--volume-id UUID]
  driver_harness.py check   --driver CLASS [--https-proxy URL]   (check_for_setup_error)

Environment: harness.py's (FERRY_TEST_S3_*, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), plus
FERRY_BIN (ferry_binary for ferry_cinder's driver).  Prints one JSON object on stdout: the
backup record as the manager left it, the exception the manager raised (class and message),
the notifications sent, and each ferry command line the driver ran (with the mode of its
config file), so a test can check that no secret went on a command line.
Exit status 0 whenever the manager ran to its end, raising or not.

Fakes beyond harness.py's: ``objects.Volume.get_by_id``/``save`` (one in-memory volume),
``_attach_device``/``_detach_device`` (the "attached device" is the image file),
``message_api``, ``volume_rpcapi.secure_file_operations_enabled`` (False), and ``open`` in
cinder.backup.manager, where ``open(path, 'wb')`` of a regular file is opened ``r+b``: on a
block device 'wb' does not truncate, on an image file it would.
"""

import argparse
import builtins
import contextlib
import importlib.util
import json
import os
import stat
import sys
import time
import traceback
import types

HERE = os.path.dirname(os.path.abspath(__file__))
_installed = importlib.util.find_spec("ferry_cinder")
if _installed is None or _installed.origin is None:
    # Not pip-installed: the package as kept in this repository.
    sys.path.insert(0, os.path.join(HERE, "ferry_cinder"))
sys.path.append(HERE)
import harness  # noqa: E402  (harness.py: configuration and the DB/notification fakes)

RUNS = []  # ferry command lines the driver ran
# stdout is for the one JSON object: everything else (oslo.log logs to stdout by default) goes
# to stderr.
OUT = sys.stdout
sys.stdout = sys.stderr


def emit(value):
    OUT.write(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")
    OUT.flush()


def record_popen():
    """Wrap subprocess.Popen to record ferry's argv and its config file's mode."""
    import subprocess
    real = subprocess.Popen

    class Recording(real):
        def __init__(self, args, *a, **kw):
            entry = {"argv": list(args) if isinstance(args, (list, tuple)) else [args]}
            argv = entry["argv"]
            if "--config" in argv:
                path = argv[argv.index("--config") + 1]
                try:
                    entry["config_mode"] = oct(stat.S_IMODE(os.stat(path).st_mode))
                except OSError as error:
                    entry["config_mode"] = "missing: %s" % error
                entry["config_path"] = path
            RUNS.append(entry)
            super().__init__(args, *a, **kw)

    subprocess.Popen = Recording


class FakeMessages(object):
    def __init__(self):
        self.created = []

    def create_from_request_context(self, context, detail=None, **kw):
        self.created.append(str(detail))

    def create(self, context, action=None, detail=None, **kw):
        self.created.append(str(detail))


def configure(args, env):
    from oslo_config import cfg
    conf = harness.configure(args, env)
    from cinder import objects
    objects.register_all()  # cinder.manager's annotations name versioned objects
    import cinder.backup.manager  # noqa: F401  (registers backup_driver)
    conf.set_override("backup_driver", args.driver)
    if args.driver.startswith("ferry_cinder."):
        import ferry_cinder.driver  # noqa: F401  (registers ferry_* options)
        if os.environ.get("FERRY_BIN"):
            conf.set_override("ferry_binary", os.environ["FERRY_BIN"])
        conf.set_override("ferry_status_poll_interval", 0.2)
    notify_every = getattr(args, "notify_every", None)
    if notify_every:
        conf.set_override("backup_object_number_per_notification", notify_every)
    conf.set_override("backup_s3_retry_max_attempts", 1)
    return conf if isinstance(conf, cfg.ConfigOpts) else cfg.CONF


def make_volume(ctx, volume_id, size_gib, status, name=None):
    from cinder import objects
    vol = objects.Volume(context=ctx)
    for key, value in dict(id=volume_id, size=size_gib, status=status,
                           previous_status="available", encryption_key_id=None,
                           display_name=name, volume_type_id=None,
                           availability_zone="nova", launched_at=None).items():
        setattr(vol, key, value)
    vol.obj_reset_changes()
    objects.Volume.get_by_id = classmethod(lambda cls, c, vid, *a, **k: vol)
    objects.Volume.save = lambda self: self.obj_reset_changes()
    return vol


def make_manager(ctx, image_path, fake_db):
    """A BackupManager whose __init__ steps we run ourselves (no RPC transport here)."""
    from cinder.backup import manager
    from oslo_config import cfg
    from oslo_utils import importutils
    CONF = cfg.CONF
    mgr = manager.BackupManager.__new__(manager.BackupManager)
    mgr.az = CONF.storage_availability_zone
    mgr.host = "ferry-driver-harness"
    mgr.is_initialized = True
    mgr._semaphore = contextlib.suppress()
    # The lines of BackupManager.__init__ that pick the driver.
    mgr.driver_name = CONF.backup_driver
    if mgr.driver_name in manager.MAPPING:
        mgr.driver_name = manager.MAPPING[mgr.driver_name]
    mgr.service = importutils.import_class(mgr.driver_name)
    mgr.message_api = FakeMessages()
    mgr.db = fake_db
    mgr.volume_rpcapi = types.SimpleNamespace(
        secure_file_operations_enabled=lambda context, volume: False)
    mgr._attach_device = lambda ctxt, dev, props, is_snapshot=False: {
        "device": {"path": image_path}}
    mgr._detach_device = lambda *a, **k: None

    from cinder.volume import volume_utils
    volume_utils.brick_get_connector_properties = lambda *a, **k: {}

    def shim_open(path, mode="r", *a, **kw):
        if mode == "wb" and os.path.isfile(path):
            mode = "r+b"
        return builtins.open(path, mode, *a, **kw)
    manager.open = shim_open

    # Every driver the manager creates gets the fake DB (the volume row for volume_meta).
    real_service = mgr.service

    def service(context):
        drv = real_service(context)
        drv.db = fake_db
        drv.backup_meta_api.db = fake_db
        return drv
    mgr.service = service
    return mgr


class ManagerDB(harness.FakeDB):
    volume_db_status = None  # the last status the manager wrote with db.volume_update

    def volume_update(self, context, volume_id, values):
        super().volume_update(context, volume_id, values)
        if "status" in values:
            ManagerDB.volume_db_status = values["status"]

    def backup_add_dependent(self, context, backup_id):
        harness.CALLS.append(("backup_add_dependent", backup_id))

    def volume_metadata_get(self, context, volume_id):
        return {}


def usage_json():
    """CPU seconds and peak RSS of this process (the cinder side) and of ferry (its child)."""
    import resource
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"cinder_cpu_s": round(me.ru_utime + me.ru_stime, 3),
            "cinder_peak_rss_kib": me.ru_maxrss,
            "children_cpu_s": round(kids.ru_utime + kids.ru_stime, 3),
            "children_peak_rss_kib": kids.ru_maxrss}


def exception_json(error):
    if error is None:
        return None
    return {"class": type(error).__name__, "module": type(error).__module__,
            "message": str(error)}


def cmd_backup(args, env):
    from cinder.objects import fields as c_fields
    configure(args, env)
    record_popen()
    notes = harness.install_fakes()
    ctx = harness.make_context()
    bucket = env["FERRY_TEST_S3_BUCKET"]
    img_size = os.path.getsize(args.image)
    size_gib = max(1, -(-img_size // harness.GiB))
    fake_db = ManagerDB({args.volume_id: harness.volume_row(
        args.volume_id, size_gib, args.volume_name)})
    make_volume(ctx, args.volume_id, size_gib, "backing-up", args.volume_name)
    mgr = make_manager(ctx, args.image, fake_db)
    probe = harness.make_driver(ctx, {})
    if args.parent_id:
        parent = harness.load_backup_record(ctx, probe, bucket, args.parent_id, args.volume_id)
        parent.service = mgr.driver_name
    backup = harness.make_backup(
        ctx, id=args.backup_id, volume_id=args.volume_id, parent_id=args.parent_id,
        display_name=args.name, display_description=args.description, size=size_gib,
        service=mgr.driver_name)

    # A cancel as Cinder's API makes it: the backup's status turns `deleting` while it runs.
    from cinder.volume import volume_utils
    stub = volume_utils.notify_about_backup_usage

    def notify(context, b, suffix, extra_usage_info=None, host=None):
        stub(context, b, suffix, extra_usage_info=extra_usage_info, host=host)
        progress = [n for n in notes if n[0] == "createprogress"]
        if args.cancel_after_notifications and len(progress) == args.cancel_after_notifications:
            harness.BACKUPS[args.backup_id].status = c_fields.BackupStatus.DELETING
    volume_utils.notify_about_backup_usage = notify

    device = types.SimpleNamespace(device_obj=None, is_snapshot=False, secure_enabled=False)
    error = None
    started = time.monotonic()
    try:
        mgr.continue_backup(ctx, backup, device)
    except Exception as e:  # the manager re-raises after recording the failure
        error = e
        traceback.print_exc(file=sys.stderr)
    out = {"manager_s": round(time.monotonic() - started, 3),
        "status": backup.status, "fail_reason": backup.fail_reason,
        "service": backup.service, "container": backup.container,
        "service_metadata": backup.service_metadata, "object_count": backup.object_count,
        "parent_id": backup.parent_id, "size": backup.size,
        "exception": exception_json(error),
        "notifications": [{"event": n[0], "percent": n[1]} for n in notes],
        "messages": mgr.message_api.created, "ferry_runs": RUNS,
        "db_calls": [list(c) for c in harness.CALLS], "usage": usage_json(),
        "eventlet": harness.EVENTLET,
    }
    if error is None and backup.status == c_fields.BackupStatus.AVAILABLE:
        exported = mgr.export_record(ctx, backup)
        out["export"] = exported
    emit(out)


def cmd_restore(args, env):
    from cinder.objects import fields as c_fields
    configure(args, env)
    record_popen()
    notes = harness.install_fakes()
    ctx = harness.make_context()
    bucket = env["FERRY_TEST_S3_BUCKET"]
    tsize = os.path.getsize(args.target) if os.path.exists(args.target) else 0
    size_gib = max(1, -(-tsize // harness.GiB))
    fake_db = ManagerDB({args.volume_id: harness.volume_row(
        args.volume_id, size_gib, "restore_backup_%s" % args.backup_id)})
    volume = make_volume(ctx, args.volume_id, size_gib,
                         "creating" if args.volume_is_new else "restoring-backup")
    mgr = make_manager(ctx, args.target, fake_db)
    probe = harness.make_driver(ctx, {})
    service = args.service or mgr.driver_name
    bid = args.backup_id
    while bid:
        rec = harness.load_backup_record(ctx, probe, bucket, bid, args.src_volume_id)
        rec.service = service
        rec.obj_reset_changes()
        bid = rec.parent_id
    backup = harness.BACKUPS[args.backup_id]
    backup.status = c_fields.BackupStatus.RESTORING
    backup.restore_volume_id = args.volume_id
    backup.obj_reset_changes()
    error = None
    started = time.monotonic()
    try:
        mgr.restore_backup(ctx, backup, args.volume_id, bool(args.volume_is_new))
    except Exception as e:
        error = e
        traceback.print_exc(file=sys.stderr)
    emit({"manager_s": round(time.monotonic() - started, 3),
        "backup_status": backup.status,
        "volume_status": ManagerDB.volume_db_status or volume.status,
        "exception": exception_json(error), "ferry_runs": RUNS,
        "notifications": [{"event": n[0], "percent": n[1]} for n in notes],
        "db_calls": [list(c) for c in harness.CALLS], "messages": mgr.message_api.created,
        "usage": usage_json(),
    })


def cmd_delete(args, env):
    configure(args, env)
    harness.install_fakes()
    ctx = harness.make_context()
    bucket = env["FERRY_TEST_S3_BUCKET"]
    from oslo_utils import importutils
    from oslo_config import cfg
    drv = importutils.import_class(cfg.CONF.backup_driver)(ctx)
    rec = harness.load_backup_record(ctx, drv, bucket, args.backup_id, args.volume_id)
    drv.delete_backup(rec)
    emit({"backup_id": rec.id, "service_metadata": rec.service_metadata})


def cmd_check(args, env):
    """The driver's check_for_setup_error, as BackupManager._setup_backup_driver runs it."""
    configure(args, env)
    harness.install_fakes()
    ctx = harness.make_context()
    from oslo_utils import importutils
    from oslo_config import cfg
    if args.https_proxy:
        cfg.CONF.set_override("backup_s3_https_proxy", args.https_proxy)
    error = None
    try:
        importutils.import_class(cfg.CONF.backup_driver)(context=ctx).check_for_setup_error()
    except Exception as e:
        error = e
    emit({"exception": exception_json(error)})


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--eventlet", action="store_true")
    p.add_argument("--debug", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("backup")
    b.add_argument("--driver", required=True)
    b.add_argument("--image", required=True)
    b.add_argument("--backup-id", required=True)
    b.add_argument("--volume-id", required=True)
    b.add_argument("--parent-id")
    b.add_argument("--compression", default="zlib")
    b.add_argument("--object-size", type=int)
    b.add_argument("--block-size", type=int)
    b.add_argument("--notify-every", type=int,
                   help="backup_object_number_per_notification")
    b.add_argument("--cancel-after-notifications", type=int)
    b.add_argument("--name")
    b.add_argument("--description")
    b.add_argument("--volume-name")
    b.add_argument("--az", default="nova")
    r = sub.add_parser("restore")
    r.add_argument("--driver", required=True)
    r.add_argument("--backup-id", required=True)
    r.add_argument("--volume-id", required=True)
    r.add_argument("--src-volume-id")
    r.add_argument("--target", required=True)
    r.add_argument("--volume-is-new", action="store_true")
    r.add_argument("--service", help="the backups' DB `service` (default: the driver's)")
    r.add_argument("--object-size", type=int)
    d = sub.add_parser("delete")
    d.add_argument("--driver", required=True)
    d.add_argument("--backup-id", required=True)
    d.add_argument("--volume-id")
    c = sub.add_parser("check")
    c.add_argument("--driver", required=True)
    c.add_argument("--https-proxy", help="backup_s3_https_proxy (which ferry refuses)")
    args = p.parse_args()
    env = harness.s3_env()
    try:
        {"backup": cmd_backup, "restore": cmd_restore, "delete": cmd_delete,
         "check": cmd_check}[args.cmd](args, env)
    except SystemExit:
        raise
    except Exception as e:  # noqa
        traceback.print_exc(file=sys.stderr)
        msg = str(e).replace(env["AWS_SECRET_ACCESS_KEY"], "***")
        harness.die("%s: %s" % (type(e).__name__, msg))


if __name__ == "__main__":
    main()
