"""`pretrain.files.hold`/`owner` on a filesystem without flock (Lustre `noflock`: ENOSYS; NFS
without lockd: ENOLCK): one warning and the caller goes on, while other errors still raise.
No such filesystem is at hand, so flock is made to answer as theirs does."""

from __future__ import annotations

import errno
import fcntl
import logging
import os

import pytest

from pretrain import files


@pytest.mark.parametrize("code", [errno.ENOSYS, errno.ENOLCK])
def test_no_flock_warns_once_and_goes_on(code, tmp_path, monkeypatch, caplog) -> None:
    def no_flock(f, op):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(files, "_warned_no_flock", False, raising=False)
    monkeypatch.setattr(fcntl, "flock", no_flock)
    lock = tmp_path / "run" / ".lock"
    with caplog.at_level(logging.WARNING, logger="pretrain"):
        held = files.hold(lock, "training process")
        again = files.hold(lock, "launcher")  # nothing to refuse it with: a warning was enough
        assert files.owner(lock) is None
    held.close()
    again.close()
    assert lock.read_text() == str(os.getpid())
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, warnings
    assert str(lock) in warnings[0] and errno.errorcode[code] in warnings[0]
    assert "nothing stops a second training process" in warnings[0] and "\n" not in warnings[0]


def test_other_lock_errors_still_raise(tmp_path, monkeypatch) -> None:
    def bad_fd(f, op):
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))

    monkeypatch.setattr(fcntl, "flock", bad_fd)
    with pytest.raises(OSError) as raised:
        files.hold(tmp_path / ".lock", "launcher")
    assert raised.value.errno == errno.EBADF


def test_a_held_lock_is_refused(tmp_path) -> None:
    held = files.hold(tmp_path / ".lock", "launcher")
    try:
        assert files.owner(tmp_path / ".lock") == str(os.getpid())
        with pytest.raises(files.ConfigError, match=r"in use by another launcher \(pid \d+\)"):
            files.hold(tmp_path / ".lock", "launcher")
    finally:
        held.close()
    assert files.owner(tmp_path / ".lock") is None
