"""Upload checks (images only, size and count limits) and the per-session bookkeeping that deletes a
session's uploaded files when the session ends.

The checks here are the app's cheap first line, run before a request queues: they read only the image
header (PIL `verify`), never decode pixels. The engine decodes and is the last word (`dsvl.ImageError`)."""

from __future__ import annotations

import os
import shutil
import threading
import warnings
from pathlib import Path

from PIL import Image

from dsvl.images import DEFAULT_MAX_PIXELS  # the core's bound: a 20000x20000 "bomb" is refused unread
FORMATS = {"PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF", "MPO"}
# Uploads one session may keep on the server at once. API clients' sessions never "close", so without it their
# files would stay until the 6-hour sweep however many they sent.
SESSION_QUOTA_BYTES = 256 * 1024 * 1024


class UploadError(ValueError):
    """A message for the user about their files; `path` is the file at fault, when one is."""

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        super().__init__(message)
        self.path = None if path is None else str(path)


def display_name(path: str | os.PathLike) -> str:
    """The name the user gave the file (Gradio keeps it as the basename inside its cache)."""
    return Path(path).name


def human_size(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} bytes"


def check_image(path: str | os.PathLike, max_bytes: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    try:
        _check_image(path, max_bytes, max_pixels)
    except UploadError as exc:
        raise UploadError(str(exc), path) from None


def _check_image(path: str | os.PathLike, max_bytes: int, max_pixels: int) -> None:
    name = display_name(path)
    try:
        size = os.path.getsize(path)
    except OSError:
        raise UploadError(f"“{name}” could not be found on the server; please attach it again.") from None
    if size == 0:
        raise UploadError(f"“{name}” is empty (0 bytes).")
    if size > max_bytes:
        raise UploadError(f"“{name}” is {human_size(size)}; the limit is {human_size(max_bytes)} per file.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                fmt, (w, h) = im.format, im.size
                im.verify()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UploadError(f"“{name}” declares an enormous size; it was refused without being decoded.") from None
    except Exception:
        raise UploadError(f"“{name}” is not an image this app can read (or the file is damaged). "
                          "Please attach a PNG, JPEG, WebP, GIF, BMP or TIFF picture.") from None
    if fmt not in FORMATS:
        raise UploadError(f"“{name}” is a {fmt} file; please attach a PNG, JPEG, WebP, GIF, BMP or TIFF picture.")
    if w * h > max_pixels:
        raise UploadError(f"“{name}” is {w}×{h} pixels; the limit is {max_pixels / 1e6:g} megapixels.")
    if w < 1 or h < 1:
        raise UploadError(f"“{name}” has no pixels.")


def check_files(files: list[str], *, max_images: int, max_bytes: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    if len(files) > max_images:
        raise UploadError(f"{len(files)} images attached; at most {max_images} per message. "
                          "Remove some and send again.")
    for f in files:
        check_image(f, max_bytes, max_pixels)


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _stamp(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def is_within(path: str | os.PathLike, roots: list[Path]) -> bool:
    real = Path(os.path.realpath(path))
    return any(real == r or r in real.parents for r in roots)


class SessionFiles:
    """Which uploaded files each session uses. When a session ends, its files that no other session
    uses are deleted (Gradio names cached uploads by content hash, so two sessions can share a file),
    together with the emptied hash folder. Only files under `roots` are ever deleted, and never the
    cached copies of the example images (an upload of the same file shares that copy)."""

    def __init__(self, roots: list[Path]):
        self.roots = [Path(os.path.realpath(r)) for r in roots]
        self.protected: set[str] = set()
        self._by_session: dict[str, set[str]] = {}
        self._dirs: dict[str, set[Path]] = {}
        # path -> (inode, mtime) when a session last used it. Another user uploading the same content replaces
        # the file (new inode): that copy may be waiting in their input box, so a session end must not delete it.
        self._stamps: dict[str, tuple[int, int] | None] = {}
        self._lock = threading.Lock()

    def protect(self, paths) -> None:
        self.protected.update(os.path.realpath(p) for p in paths)

    def track(self, session: str, paths: list[str]) -> list[str]:
        """Note that `session` uses these files; returns those it did not use before."""
        with self._lock:
            real = [os.path.realpath(p) for p in paths]
            mine = self._by_session.setdefault(session, set())
            new = [p for p in dict.fromkeys(real) if p not in mine]
            mine.update(real)
            self._stamps.update((p, _stamp(p)) for p in real)
            return new

    def check_quota(self, session: str, new: list[str], quota: int = SESSION_QUOTA_BYTES) -> None:
        """Refuse (deleting the `new` files) when the session's uploads together exceed `quota` bytes."""
        with self._lock:
            used = sum(os.path.getsize(p) for p in self._by_session.get(session, ()) if os.path.isfile(p))
        if used > quota:
            self.discard(session, new)
            raise UploadError(f"This chat already holds {human_size(used - sum(map(_size, new)))} of uploads; "
                              f"the limit is {human_size(quota)}. Reload the page (a new session) to attach "
                              "more.")

    def discard(self, session: str, paths: list[str]) -> int:
        """Delete refused uploads now rather than when the session ends; returns how many were deleted."""
        real = {os.path.realpath(p) for p in paths}
        with self._lock:
            self._by_session.get(session, set()).difference_update(real)
            others = set().union(*self._by_session.values()) if self._by_session else set()
            stamps = {p: self._stamps.pop(p, None) for p in real - others}
        return self._delete(stamps)

    def track_dir(self, session: str, directory: Path) -> None:
        with self._lock:
            self._dirs.setdefault(session, set()).add(directory)

    def release(self, session: str) -> int:
        """Forget a session and delete what only it used; returns how many files were deleted."""
        with self._lock:
            mine = self._by_session.pop(session, set())
            dirs = self._dirs.pop(session, set())
            others = set().union(*self._by_session.values()) if self._by_session else set()
            stamps = {p: self._stamps.pop(p, None) for p in mine - others}
        deleted = self._delete(stamps)
        for d in dirs:
            if is_within(d, self.roots):
                shutil.rmtree(d, ignore_errors=True)
        return deleted

    def _delete(self, stamps: dict[str, tuple[int, int] | None]) -> int:
        deleted = 0
        for path in set(stamps) - self.protected:
            p = Path(path)
            if not is_within(p, self.roots) or _stamp(path) != stamps[path]:
                continue  # outside the upload folder, or uploaded again (by someone else) since this session used it
            try:
                p.unlink()
                deleted += 1
                parent = p.parent
                if parent not in self.roots and is_within(parent, self.roots) and not any(parent.iterdir()):
                    parent.rmdir()
            except OSError:
                pass
        return deleted

    def sessions(self) -> int:
        with self._lock:
            return len(self._by_session)
