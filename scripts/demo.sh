#!/usr/bin/env bash
# Demonstrates the main job with no server: builds ferry, generates a mixed sample volume
# (zeros, compressible text, random bytes), backs it up into a local directory repository,
# backs it up again (nothing new is stored), restores it to a new file, and checks that the
# restored file is identical to the original.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
size=${FERRY_DEMO_SIZE:-512M}
work=${FERRY_DEMO_DIR:-target/demo}

cargo build --release --locked --bins
ferry=target/release/ferry
rm -rf "$work" && mkdir -p "$work"

echo "== generating a $size sample volume (40% zeros, 30% text, 30% random)"
target/release/bench gen-image "$work/volume.img" --size "$size" --mix mixed

echo "== ferry init"
"$ferry" --repo "$work/repo" init
echo "== ferry backup"
"$ferry" --repo "$work/repo" backup --source "$work/volume.img"
echo "== ferry backup again (unchanged volume: only a manifest is written)"
"$ferry" --repo "$work/repo" backup --source "$work/volume.img"
echo "== ferry list"
"$ferry" --repo "$work/repo" list
backup_id=$("$ferry" --repo "$work/repo" list | head -n 1 | cut -d' ' -f1)
echo "== ferry restore $backup_id"
"$ferry" --repo "$work/repo" restore "$backup_id" --target "$work/restored.img"

echo "== comparing"
cmp "$work/volume.img" "$work/restored.img"
echo "identical: $(du -h --apparent-size "$work/volume.img" | cut -f1) volume, repository uses $(du -sh "$work/repo" | cut -f1)"
