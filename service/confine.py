"""Namespaces for a parser child (service/sandbox.py): no network, and the data folder out of sight.

Entered in the child between fork and exec, after its rlimits: a new user namespace (the child is
root there and nobody outside it), a new network namespace (only a loopback that is down, so every
connect fails) and a new mount namespace. There, each hidden folder (the data folder, a local
storage root) is covered by an empty tmpfs, and the child's own folder, which the parent made under
the data folder's `tmp/` so that an upload can be hard-linked into it, is bind-mounted back as
`<first hidden folder>/inbox` and made the working directory. The child sees its inbox and nothing
else of ours: not the database file, not the stored objects, not the other uploads in flight.

Python 3.11 has no os.unshare, so libc's unshare and mount are called through ctypes. Kernels or
containers that refuse unprivileged user namespaces make `available()` false; the sandbox then runs
with its rlimits only, and says so (start-up log, /readyz details for an admin).
"""

import ctypes
import os
import subprocess
import tempfile
from dataclasses import dataclass

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 8, 4096, 16384, 1 << 18
INBOX = "inbox"


@dataclass(frozen=True)
class Confinement:
    hidden: tuple[str, ...]  # absolute folders the child must not see
    inbox_root: str  # where each child's own folder is made (inside a hidden folder, on the uploads' filesystem)

    @classmethod
    def of(cls, *folders, inbox_root) -> "Confinement":
        absolute = sorted({os.path.abspath(f) for f in folders}, key=len)
        # A folder inside another is hidden with it (and would not exist under the outer tmpfs).
        outer = [f for i, f in enumerate(absolute) if not any(f.startswith(o + os.sep) for o in absolute[:i])]
        return cls(hidden=tuple(outer), inbox_root=os.path.abspath(inbox_root))


def enter(confinement: Confinement, folder: str) -> None:
    """In the child, before exec: raise OSError when the kernel refuses a step."""
    uid, gid = os.getuid(), os.getgid()
    libc = ctypes.CDLL(None, use_errno=True)
    _call(libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET), "unshare")
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"0 {uid} 1")
    _write("/proc/self/gid_map", f"0 {gid} 1")
    _call(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /")
    own = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)  # held while its path is covered
    for hidden in confinement.hidden:
        if os.path.isdir(hidden):
            _call(libc.mount(b"tmpfs", hidden.encode(), b"tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, b"size=64k,mode=0755"),
                  f"mount tmpfs on {hidden}")
    inbox = os.path.join(confinement.hidden[0], INBOX)
    os.mkdir(inbox)
    _call(libc.mount(f"/proc/self/fd/{own}".encode(), inbox.encode(), None, MS_BIND, None), "bind the inbox")
    os.close(own)
    os.chdir(inbox)


def _call(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def available(confinement: Confinement) -> bool:
    """Whether this kernel lets a child enter the namespaces: one /bin/true started inside them."""
    os.makedirs(confinement.inbox_root, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=confinement.inbox_root) as folder:
        try:
            subprocess.run(["/bin/true"], preexec_fn=lambda: enter(confinement, folder), check=True, timeout=30,
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except (OSError, subprocess.SubprocessError):
            return False
    return True
