"""Runs the real ChunkedBackupDriver methods from a cinder source tree (CINDER_SRC) against a
directory-backed object store, with the database, RPC and notification calls stubbed."""
import ast, hashlib, json, os, sys, types

CINDER = os.environ["CINDER_SRC"]
src = open(os.path.join(CINDER, "backup", "chunkeddriver.py")).read()
tree = ast.parse(src)
cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "ChunkedBackupDriver")
funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
body = [n for n in cls.body if isinstance(n, (ast.FunctionDef, ast.Assign))]
for n in body:
    if isinstance(n, ast.FunctionDef):
        n.decorator_list = []  # abc.abstractmethod: the stubs below implement them
base = ast.ClassDef(name="Base", bases=[], keywords=[], body=body, decorator_list=[], type_params=[])
module = ast.Module(body=funcs + [base], type_ignores=[])
ast.fix_missing_locations(module)

ns = types.SimpleNamespace
class Err(Exception):
    def __init__(self, *a, **k):
        super().__init__(a, k)
noop = lambda *a, **k: None
g = {
    "utils": ns(tpool_wrap=lambda f: f, cooperative_yield=noop),
    "LOG": ns(debug=noop, info=noop, warning=noop, error=noop, exception=noop),
    "CONF": ns(backup_compression_algorithm=None),
    "_": lambda s: s,
    "exception": ns(InvalidBackup=Err, BackupRestoreCancel=Err, InvalidVolume=Err,
                    BackupMetadataUnsupportedVersion=Err, BackupOperationError=Err),
    "fields": ns(BackupStatus=ns(DELETING="deleting", DELETED="deleted", RESTORING="restoring")),
    "loopingcall": ns(FixedIntervalLoopingCall=lambda f: ns(start=noop, stop=noop)),
    "volume_utils": ns(is_all_zero=lambda b: not any(b), notify_about_backup_usage=noop),
    "units": ns(Gi=1 << 30),
    "json": json, "hashlib": hashlib, "os": os,
}
BACKUPS = {}
g["objects"] = ns(Backup=ns(get_by_id=lambda ctx, i: BACKUPS[i]))
exec(compile(module, "chunkeddriver.py", "exec"), g)

class Backup(dict):
    def __getattr__(self, k):
        return self[k]
    def __setattr__(self, k, v):
        self[k] = v
    def refresh(self): pass
    def save(self): pass
    def as_read_deleted(self):
        class C:
            def __enter__(s): return s
            def __exit__(s, *a): return False
        return C()

class Store:
    def __init__(self, root): self.root = root
    def path(self, name): return os.path.join(self.root, name.replace("/", "#"))
    def keys(self): return [k.replace("#", "/") for k in os.listdir(self.root)]

class Writer:
    def __init__(self, p): self.p, self.buf = p, bytearray()
    def __enter__(self): return self
    def __exit__(self, *a):
        open(self.p, "wb").write(bytes(self.buf)); return False
    def write(self, d): self.buf += d

class Reader:
    def __init__(self, p): self.p = p
    def __enter__(self): return self
    def __exit__(self, *a): return False
    def read(self): return open(self.p, "rb").read()

def stores_for(b): return STORES[b["id"]]
STORES = {}

class Driver(g["Base"]):
    def __init__(self, cfg):
        g["CONF"].backup_compression_algorithm = cfg.get("algo", "zlib")
        self.chunk_size_bytes = cfg.get("object_size", 0)
        self.sha_block_size_bytes = cfg.get("block_size", 32768)
        self.backup_compression_algorithm = g["CONF"].backup_compression_algorithm
        self.compressor = self._get_compressor(self.backup_compression_algorithm)
        self.enable_progress_timer = False
        self.data_block_num = 1
        self.backup_timer_interval = 120
        self.context = None
        self.az = "nova"
        self.prefix = cfg.get("prefix")
        self.volume_meta = cfg.get("volume_meta")
        self.db = ns(volume_get=lambda ctx, vid: {"size": cfg.get("size_gib", 1)})
    def _create_container(self, b): return b.container
    def _generate_object_name_prefix(self, b): return self.prefix
    def get_object_writer(self, c, name, extra_metadata=None): return Writer(stores_for_name(name))
    def get_object_reader(self, c, name, extra_metadata=None): return Reader(stores_for_name(name))
    def get_container_entries(self, c, prefix):
        return [k for s in STORES.values() for k in s.keys() if k.startswith(prefix)]
    def get_extra_metadata(self, b, v): return None
    def get_metadata(self, vid): return self.volume_meta
    def put_metadata(self, vid, meta): pass
    def delete_backup(self, b): pass

def stores_for_name(name):
    for prefix, store in PREFIXES.items():
        if name.startswith(prefix):
            return store.path(name)
    raise KeyError(name)
PREFIXES = {}

def register(b):
    store = Store(b["dir"])
    STORES[b["id"]] = store
    PREFIXES[b["prefix"]] = store
    BACKUPS[b["id"]] = Backup(id=b["id"], volume_id=b.get("volume_id", "vol"), container="bucket",
                              parent_id=b.get("parent_id"), size=b.get("size_gib", 1),
                              display_name=b.get("name"), display_description=b.get("description"),
                              created_at=b.get("created_at"), service_metadata=b["prefix"],
                              status="restoring", object_count=0)
    return BACKUPS[b["id"]]

cfg = json.load(open(sys.argv[1]))
for b in cfg.get("known", []):
    register(b)
if cfg["mode"] == "backup":
    b = register(cfg["backup"])
    b["status"] = "creating"
    d = Driver(cfg)
    with open(cfg["image"], "rb") as f:
        d.backup(b, f)
    print(json.dumps({"object_count": b["object_count"]}))
else:
    d = Driver(cfg)
    last = BACKUPS[cfg["requested"]]
    with open(cfg["target"], "r+b") as f:
        d.restore(last, "vol", f, cfg.get("volume_is_new", False))
    print("{}")
