"""A cinder-backup driver that moves the data with ferry.

``backup_driver = ferry_cinder.driver.FerryBackupDriver`` in cinder.conf makes cinder-backup run
``ferry --format cinder`` on the device the backup manager attached, instead of reading,
hashing, compressing and uploading in Python.  ferry writes exactly the objects Cinder's own S3
driver (``cinder.backup.drivers.s3.S3BackupDriver``) writes, so each driver restores the other's
backups.

What runs where:

* ``backup`` / ``restore``: a ``ferry`` subprocess per call, fed the same ``backup_s3_*``
  options Cinder's S3 driver reads, through a private (0600) config file that is removed when
  ferry exits; secrets never go on ferry's command line.  ferry's JSON Lines events become
  Cinder's progress notifications, its exit code one of Cinder's exceptions.
* While ferry runs, the driver re-reads the backup's status (as the chunked driver does between
  objects) and stops ferry with SIGTERM when Cinder asks for a cancel; ferry then deletes what
  it stored and aborts its uploads.
* Everything else is the stock S3 driver this class inherits from: ``check_for_setup_error``
  (plus a check of the ferry binary), bucket creation, ``delete_backup``, the export/import
  records, and the volume metadata written into and restored from ``_metadata``.

It deliberately does not change Cinder's backup records beyond what the S3 driver sets
(``container``, ``service_metadata``, ``object_count``), and it does not run ferry on volume
handles without a path or file descriptor (RBD): those go through the inherited Python path.
"""

import collections
import json
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
import time

from oslo_config import cfg
from oslo_log import log as logging

from cinder.backup.drivers import s3
from cinder import exception
from cinder import objects
from cinder.objects import fields
from cinder.volume import volume_utils

LOG = logging.getLogger(__name__)

ferry_opts = [
    cfg.StrOpt('ferry_binary', default='ferry',
               help='The ferry executable: a path, or a name found on PATH.'),
    cfg.StrOpt('ferry_s3_region',
               help='S3 region ferry signs requests for. Cinder has no region option; '
                    'default: AWS_REGION or AWS_DEFAULT_REGION of cinder-backup\'s '
                    'environment, as boto3 in the stock driver does, else ferry\'s default.'),
    cfg.ListOpt('ferry_backup_args', default=[],
                help='Extra ferry backup flags, e.g. --workers=4,--cinder-uploads=8.'),
    cfg.ListOpt('ferry_restore_args', default=[],
                help='Extra ferry restore flags, e.g. --downloads-in-flight=8.'),
    cfg.FloatOpt('ferry_status_poll_interval', default=1.0, min=0.05,
                 help='Seconds between two reads of the backup\'s status while ferry runs '
                      '(a cancel is noticed within this time).'),
    cfg.IntOpt('ferry_stop_timeout', default=300, min=1,
               help='Seconds ferry gets to clean up after SIGTERM before it is killed.'),
    cfg.StrOpt('ferry_tmp_dir',
               help='Directory for the private per-job config file (default: the system '
                    'temporary directory).'),
]

CONF = cfg.CONF
CONF.register_opts(ferry_opts)

# ferry's exit codes (README, "Exit codes").
EXIT_OK = 0
EXIT_USAGE = 2
EXIT_DEVICE = 3
EXIT_STORE = 4
EXIT_INTEGRITY = 5
EXIT_CANCELLED = 6
EXIT_NOT_FOUND = 7
EXIT_REFUSED = 8

# Environment variables that would override cinder.conf inside ferry; cinder.conf is the truth.
_SCRUBBED_ENV = ('AWS_ACCESS_KEY_ID', 'AWS_SECRET_ACCESS_KEY', 'AWS_SESSION_TOKEN',
                 'AWS_ENDPOINT_URL', 'AWS_ENDPOINT_URL_S3', 'AWS_REGION', 'FERRY_REPO',
                 'FERRY_CONFIG')

_TIMEOUT = object()
_EOF = object()


class FerryFailure(exception.BackupDriverException):
    """ferry failed in a way no more specific Cinder exception describes."""
    message = "ferry failed: %(reason)s"


def _toml_value(value):
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if isinstance(value, (int, float)):
        return repr(value)
    # A JSON string is a valid TOML basic string (same escapes, \\uXXXX included).
    return json.dumps(str(value))


def _device_path(volume_file):
    """The path ferry opens for the manager's ``volume_file``, or None (no path, no fd)."""
    name = getattr(volume_file, 'name', None)
    if isinstance(name, str) and os.path.exists(name):
        return name
    if isinstance(volume_file, str) and os.path.exists(volume_file):
        return volume_file
    try:
        fd = volume_file.fileno()
    except Exception:
        return None
    # Our own /proc entry reopens the very file the manager opened, even once unlinked.
    return '/proc/%d/fd/%d' % (os.getpid(), fd)


def _source_volume_id(backup):
    """The volume id in the backup's prefix (``volume_<id>/...``), else ``backup.volume_id``.

    An imported backup may carry another volume id than the one its objects are stored under.
    """
    prefix = backup.service_metadata or ''
    head = prefix.split('/', 1)[0]
    if head.startswith('volume_') and len(head) > len('volume_'):
        return head[len('volume_'):]
    return backup.volume_id


class _FerryRun(object):
    """One ferry process: its JSON events on a queue, the tail of its stderr kept for errors."""

    def __init__(self, argv, env):
        LOG.info('Running %s', ' '.join(argv))
        self.argv = argv
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env, close_fds=True)
        self.events = queue.Queue()
        self.stderr_tail = collections.deque(maxlen=20)
        self._threads = [threading.Thread(target=self._read_stdout, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for thread in self._threads:
            thread.start()

    def _read_stdout(self):
        try:
            for raw in self.proc.stdout:
                line = raw.decode('utf-8', 'replace').strip()
                if not line:
                    continue
                try:
                    self.events.put(json.loads(line))
                except ValueError:
                    LOG.warning('ferry wrote a line that is not JSON: %s', line[:200])
        finally:
            self.events.put(_EOF)

    def _read_stderr(self):
        for raw in self.proc.stderr:
            line = raw.decode('utf-8', 'replace').rstrip()
            if line:
                self.stderr_tail.append(line)
                LOG.debug('ferry: %s', line)

    def next_event(self, timeout):
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            return _TIMEOUT

    def terminate(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout):
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            LOG.error('ferry (pid %d) did not exit %d s after SIGTERM; killing it',
                      self.proc.pid, timeout)
            self.proc.kill()
            code = self.proc.wait()
        for thread in self._threads:
            thread.join(timeout=5)
        return code

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class FerryBackupDriver(s3.S3BackupDriver):
    """Cinder's S3 backup driver with ferry as the data mover."""

    def __init__(self, context):
        super().__init__(context)
        self.ferry_binary = CONF.ferry_binary
        self.poll_interval = CONF.ferry_status_poll_interval

    # ------------------------------------------------------------------ setup

    def check_for_setup_error(self):
        """What ferry cannot do, the ferry binary, then the stock S3 checks (ListBuckets)."""
        unsupported = [name for name in ('backup_s3_http_proxy', 'backup_s3_https_proxy',
                                         'backup_s3_sse_customer_key',
                                         'backup_s3_sse_customer_algorithm')
                       if getattr(CONF, name)]
        if unsupported:
            raise exception.InvalidConfigurationValue(
                option=', '.join(unsupported),
                value='set (ferry does not support proxies or SSE-C; use '
                      'cinder.backup.drivers.s3.S3BackupDriver)')
        binary = shutil.which(self.ferry_binary)
        if binary is None:
            raise exception.BackupDriverException(
                reason='ferry_binary %r not found (install ferry or set ferry_binary)'
                       % self.ferry_binary)
        try:
            out = subprocess.run([binary, '--version'], capture_output=True, timeout=30,
                                 check=True)
        except (OSError, subprocess.SubprocessError) as error:
            raise exception.BackupDriverException(
                reason='%s --version failed: %s' % (binary, error))
        LOG.info('ferry backup driver: %s', out.stdout.decode('utf-8', 'replace').strip())
        super().check_for_setup_error()

    # --------------------------------------------------------------- ferry I/O

    def _config_text(self):
        """The `[cinder]` table of ferry's config: cinder.conf's options under their names."""
        values = collections.OrderedDict([
            ('backup_s3_endpoint_url', CONF.backup_s3_endpoint_url),
            ('backup_s3_store_access_key', CONF.backup_s3_store_access_key),
            ('backup_s3_store_secret_key', CONF.backup_s3_store_secret_key),
            ('backup_s3_store_bucket', CONF.backup_s3_store_bucket),
            ('backup_s3_object_size', CONF.backup_s3_object_size),
            ('backup_s3_block_size', CONF.backup_s3_block_size),
            ('backup_s3_verify_ssl', CONF.backup_s3_verify_ssl),
            ('backup_s3_ca_cert_file', CONF.backup_s3_ca_cert_file),
            ('backup_s3_timeout', float(CONF.backup_s3_timeout)),
            ('backup_s3_retry_max_attempts', CONF.backup_s3_retry_max_attempts),
            ('backup_compression_algorithm', CONF.backup_compression_algorithm),
            ('storage_availability_zone', CONF.storage_availability_zone),
        ])
        lines = ['# written by ferry_cinder for one job; removed when ferry exits', '[cinder]']
        lines += ['%s = %s' % (key, _toml_value(value))
                  for key, value in values.items() if value is not None]
        return '\n'.join(lines) + '\n'

    def _private_file(self, text, suffix):
        """A 0600 file holding `text` (mkstemp creates it 0600); the caller removes it."""
        fd, path = tempfile.mkstemp(prefix='ferry-cinder-', suffix=suffix,
                                    dir=CONF.ferry_tmp_dir or None)
        with os.fdopen(fd, 'w') as handle:
            handle.write(text)
        return path

    def _command(self, container, config_path):
        argv = [self.ferry_binary, '--json', '--repo', 's3://%s' % container,
                '--config', config_path]
        region = (CONF.ferry_s3_region or os.environ.get('AWS_REGION')
                  or os.environ.get('AWS_DEFAULT_REGION'))
        if region:
            argv += ['--s3-region', region]
        return argv

    @staticmethod
    def _environment():
        env = dict(os.environ)
        for key in _SCRUBBED_ENV:
            env.pop(key, None)
        return env

    def _run_ferry(self, argv, on_progress, should_stop):
        """Runs ferry to the end; returns (exit code, final event or None, stopped by us)."""
        run = _FerryRun(argv, self._environment())
        final = None
        stopped = False
        checked = time.monotonic()
        try:
            while True:
                event = run.next_event(self.poll_interval)
                if event is _EOF:
                    break
                if event is not _TIMEOUT:
                    kind = event.get('event')
                    if kind in ('result', 'error'):
                        final = event
                    elif kind == 'progress' and not stopped:
                        on_progress(event)
                    elif kind == 'warning':
                        LOG.warning('ferry: %s', event.get('message'))
                now = time.monotonic()
                if not stopped and (event is _TIMEOUT or now - checked >= self.poll_interval):
                    checked = now
                    if should_stop():
                        LOG.info('Stopping ferry (pid %d) with SIGTERM', run.proc.pid)
                        run.terminate()
                        stopped = True
            code = run.wait(CONF.ferry_stop_timeout)
        except BaseException:
            run.kill()
            raise
        if final is None and code != 0:
            LOG.error('ferry exited with %s and no final event; its last stderr lines:\n%s',
                      code, '\n'.join(run.stderr_tail))
        elif code != 0:
            LOG.error('ferry failed (exit %d): %s', code, final.get('message'))
        return code, final, stopped

    @staticmethod
    def _failure(action, backup, code, final):
        """The Cinder exception for a failed ferry run."""
        if final is not None:
            code = final.get('exit_code', code)
            reason = '%s of backup %s failed: %s (ferry exit %s)' % (
                action, backup.id, final.get('message'), code)
        elif code < 0:
            reason = ('%s of backup %s failed: ferry was killed by signal %d before it '
                      'finished' % (action, backup.id, -code))
        else:
            reason = ('%s of backup %s failed: ferry exited with %d without a final event'
                      % (action, backup.id, code))
        if code in (EXIT_INTEGRITY, EXIT_NOT_FOUND):
            return exception.InvalidBackup(reason=reason)
        if code == EXIT_STORE:
            return s3.S3ConnectionFailure(reason=reason)
        if code in (EXIT_DEVICE, EXIT_REFUSED):
            return exception.BackupOperationError(reason)
        return FerryFailure(reason=reason)

    # ----------------------------------------------------------------- backup

    def _check_parent(self, backup, container):
        if not backup.parent_id:
            return None
        parent = objects.Backup.get_by_id(self.context, backup.parent_id)
        # The checks ChunkedBackupDriver.backup makes before reading a byte.
        if backup.size is not None and parent.size is not None and backup.size > parent.size:
            raise exception.InvalidBackup(
                reason='Volume size increased since the last backup. Do a full backup.')
        if parent.container != container:
            raise exception.InvalidBackup(
                reason='parent backup %s is in bucket %s, this one goes to %s: ferry reads '
                       'the parent from the same bucket; do a full backup'
                       % (parent.id, parent.container, container))
        return parent

    def backup(self, backup, volume_file, backup_metadata=True):
        """Backs up the volume behind `volume_file` with ferry (an incremental with a parent)."""
        source = _device_path(volume_file)
        if source is None:
            LOG.warning('Backup %s: the volume handle has no path or file descriptor; '
                        'using the S3 driver\'s own Python data path', backup.id)
            return super().backup(backup, volume_file, backup_metadata)
        if self.chunk_size_bytes % self.sha_block_size_bytes:
            raise exception.InvalidBackup(
                reason='Chunk size is not multiple of block size for creating hash.')
        volume = self.db.volume_get(self.context, backup.volume_id)
        if volume['size'] <= 0:
            raise exception.InvalidVolume(reason='volume size %d is invalid.' % volume['size'])
        # Sets backup.container (default bucket), saves, creates the bucket like the S3 driver.
        container = self._create_container(backup)
        self._check_parent(backup, container)
        volume_meta = self.get_metadata(backup.volume_id) if backup_metadata else None

        files = []
        try:
            config_path = self._private_file(self._config_text(), '.toml')
            files.append(config_path)
            argv = self._command(container, config_path)
            argv += ['backup', '--format', 'cinder', '--source', source,
                     '--cinder-backup-id', backup.id, '--cinder-volume-id', backup.volume_id]
            if backup.parent_id:
                argv += ['--incremental-parent', backup.parent_id]
            # `--flag=value`: a name starting with '-' stays a value.
            if backup.display_name is not None:
                argv.append('--cinder-backup-name=%s' % backup.display_name)
            if backup.display_description is not None:
                argv.append('--cinder-backup-description=%s' % backup.display_description)
            if volume_meta:
                meta_path = self._private_file(volume_meta, '.json')
                files.append(meta_path)
                argv.append('--cinder-volume-meta-file=%s' % meta_path)
            argv += list(CONF.ferry_backup_args)
            progress = _BackupProgress(self, backup, volume['size'])
            code, final, stopped = self._run_ferry(
                argv, progress.on_event, lambda: self._backup_cancelled(backup))
        finally:
            for path in files:
                try:
                    os.unlink(path)
                except OSError:
                    pass

        if stopped:
            # ferry deleted what it stored; a run that finished before the signal is deleted
            # here, as the chunked driver deletes a cancelled backup's objects.
            stats = (final or {}).get('stats') or {}
            if code == EXIT_OK and stats.get('prefix'):
                backup.service_metadata = stats['prefix']
                self.delete_backup(backup)
            LOG.info('Backup %s cancelled; ferry exited with %s.', backup.id, code)
            return
        if code != EXIT_OK or final is None or final.get('event') != 'result':
            raise self._failure('Backup', backup, code, final)
        stats = final.get('stats') or {}
        backup.service_metadata = stats['prefix']
        backup.container = container
        backup.object_count = stats['object_count']
        backup.save()
        progress.end(stats)
        LOG.info('Backup %s: %d objects under %s in %s, %d bytes uploaded in %.1f s.',
                 backup.id, stats['object_count'], stats['prefix'], container,
                 stats.get('bytes_uploaded', 0), stats.get('duration_ms', 0) / 1000.0)
        return {'service_metadata': backup.service_metadata, 'container': container,
                'object_count': backup.object_count}

    def _backup_cancelled(self, backup):
        with backup.as_read_deleted():
            backup.refresh()
        return backup.status in (fields.BackupStatus.DELETING, fields.BackupStatus.DELETED)

    # ---------------------------------------------------------------- restore

    def restore(self, backup, volume_id, volume_file, volume_is_new):
        """Restores `backup` (its whole chain) into the volume behind `volume_file` with ferry.

        Raises BackupRestoreCancel when the backup's status leaves `restoring` meanwhile.
        """
        target = _device_path(volume_file)
        if target is None:
            LOG.warning('Restore of %s: the volume handle has no path or file descriptor; '
                        'using the S3 driver\'s own Python data path', backup.id)
            return super().restore(backup, volume_id, volume_file, volume_is_new)
        if not backup.container or not backup.service_metadata:
            raise exception.InvalidBackup(
                reason='backup %s has no container or service_metadata' % backup.id)
        link = backup
        while link.parent_id:
            link = objects.Backup.get_by_id(self.context, link.parent_id)
            if link.container != backup.container:
                raise exception.InvalidBackup(
                    reason='backup %s is in bucket %s and its ancestor %s in %s: ferry '
                           'restores a chain from one bucket'
                           % (backup.id, backup.container, link.id, link.container))
        config_path = self._private_file(self._config_text(), '.toml')
        try:
            argv = self._command(backup.container, config_path)
            argv += ['restore', '--format', 'cinder', backup.id,
                     '--cinder-volume-id', _source_volume_id(backup),
                     '--target', target, '--force']
            if volume_is_new:
                # Zeros are skipped only on a new volume, as Cinder does.
                argv.append('--sparse')
            argv += list(CONF.ferry_restore_args)
            code, final, stopped = self._run_ferry(
                argv, lambda event: None, lambda: self._restore_cancelled(backup))
        finally:
            try:
                os.unlink(config_path)
            except OSError:
                pass
        if stopped:
            raise exception.BackupRestoreCancel(back_id=backup.id, vol_id=volume_id)
        if code != EXIT_OK or final is None or final.get('event') != 'result':
            raise self._failure('Restore', backup, code, final)
        stats = final.get('stats') or {}
        chain_meta = stats.get('chain_volume_meta')
        if chain_meta is None:
            chain_meta = [final.get('volume_meta')]
        # As ChunkedBackupDriver.restore: each link's volume metadata, base first.
        for volume_meta in chain_meta:
            try:
                if volume_meta:
                    self.put_metadata(volume_id, volume_meta)
                else:
                    LOG.debug('No volume metadata in this backup.')
            except exception.BackupMetadataUnsupportedVersion:
                msg = 'Metadata restore failed due to incompatible version.'
                LOG.error(msg)
                raise exception.BackupOperationError(msg)
        LOG.info('Restored backup %s (chain %s) to volume %s in %.1f s.', backup.id,
                 ' -> '.join(stats.get('chain') or [backup.id]), volume_id,
                 stats.get('duration_ms', 0) / 1000.0)

    def _restore_cancelled(self, backup):
        with backup.as_read_deleted():
            backup.refresh()
        return backup.status != fields.BackupStatus.RESTORING


class _BackupProgress(object):
    """ferry's progress events as Cinder's `backup.createprogress` notifications.

    Sent like the chunked driver sends them: every `backup_object_number_per_notification`
    objects' worth of data read, every `backup_timer_interval` seconds when
    `backup_s3_enable_progress_timer` is set, and 100 at the end.
    """

    def __init__(self, driver, backup, volume_size_gib):
        self.driver = driver
        self.backup = backup
        self.step_bytes = max(1, driver.chunk_size_bytes * max(1, driver.data_block_num))
        self.next_bytes = self.step_bytes
        self.timer = driver.backup_timer_interval if driver.enable_progress_timer else None
        self.last_sent = time.monotonic()
        self.volume_bytes = volume_size_gib * 1024 ** 3
        self.sent = 0

    def _send(self, percent, extra):
        info = {'backup_percent': percent}
        info.update(extra)
        volume_utils.notify_about_backup_usage(self.driver.context, self.backup,
                                               'createprogress', extra_usage_info=info)
        self.last_sent = time.monotonic()
        self.sent += 1

    def on_event(self, event):
        read = event.get('bytes_read') or 0
        total = event.get('bytes_total') or self.volume_bytes
        due = read >= self.next_bytes
        if self.timer and time.monotonic() - self.last_sent >= self.timer:
            due = True
        # 100 is sent once, by end(), after the last object and the documents are stored.
        if not due or not total or read >= total:
            return
        while self.next_bytes <= read:
            self.next_bytes += self.step_bytes
        self._send(read * 100.0 / total,
                   {'bytes_read': read, 'bytes_total': total,
                    'bytes_uploaded': event.get('bytes_uploaded')})

    def end(self, stats):
        self._send(100, {'prefix': stats.get('prefix'),
                         'object_count': stats.get('object_count')})
