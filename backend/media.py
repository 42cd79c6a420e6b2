"""Fetch task images as RGB PIL images: resolve LS media URLs, send LS credentials only to LS, enforce limits.

URL forms (reference label_studio.md §4.2, §10):
- `/data/local-files/?d=<rel>`: read from `local_files_root` when set (the path must stay inside it), else downloaded
  from LS with credentials.
- any other relative path (`/data/upload/1/a.png`, `/storage-data/...`): downloaded from `{LS}<path>` with credentials;
  a 404 on `/data/upload/<f>` retries LS's newer proxy `/storage-data/uploaded/?filepath=upload/<f>`.
- `http(s)://…`: the LS origin (with credentials) or a host in `allowed_hosts` (without); others are refused (403).
  `allowed_hosts` entries: "host" (any port), "host:port", or "*.example.com" (that domain and its subdomains).
- `s3://`, `gs://`, `azure-blob://`: presigned by LS at `GET {LS}/tasks/{task_id}/presign/?fileuri=<urlsafe b64>`,
  which redirects to the storage. That first hop, chosen by LS, is allowed without allow-listing the storage host.

Redirects are followed by hand (at most 5): credentials are computed per hop (so dropped off the LS origin) and every
other hop must pass the same host check. Downloads stop at `max_bytes` and after `timeout` seconds in total; images
above `max_pixels` are refused before decoding. The result is EXIF-transposed (the browser shows it so, and masks are
encoded at that size) and converted to 8-bit RGB (transparency composited on white; 16-bit scaled; first frame).
"""

from __future__ import annotations

import base64
import io
import time
import warnings
import weakref
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urljoin, urlsplit

import httpx
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from backend.errors import MediaError
from backend.ls_auth import LabelStudioAuth, origin

CLOUD_SCHEMES = ("s3", "gs", "azure-blob", "azure-spi")
MAX_REDIRECTS = 5
_CHUNK = 64 * 1024
_SIGNATURES = ((b"\x89PNG", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF8", "GIF"), (b"RIFF", "WebP"), (b"BM", "BMP"),
               (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))


class ImageFetcher:
    """Downloads and decodes task images for one Label Studio instance (thread-safe; reuses connections)."""

    def __init__(self, ls_url: str | None, auth: LabelStudioAuth | None, *, local_files_root: Path | None = None,
                 allowed_hosts: Sequence[str] = (), max_bytes: int = 50 * 2**20, max_pixels: int = 50_000_000,
                 timeout: float = 20.0) -> None:
        if ls_url is not None and origin(ls_url) is None:
            raise ValueError("the Label Studio URL must be an absolute http(s) URL")
        self.ls_url = ls_url.rstrip("/") if ls_url else (auth.ls_url if auth is not None else None)
        self.auth = auth
        self.local_files_root = Path(local_files_root).resolve() if local_files_root else None
        self.allowed_hosts = [host.strip().lower() for host in allowed_hosts if host.strip()]
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.timeout = timeout
        # trust_env=False: no .netrc credentials or env proxies are applied behind our back.
        self._client = httpx.Client(follow_redirects=False, trust_env=False, timeout=timeout)
        # Closed by `close`, or once nothing refers to the fetcher any more (e.g. dropped from a cache while a
        # thread was still fetching with it).
        self._closer = weakref.finalize(self, self._client.close)

    def close(self) -> None:
        """Close pooled connections."""
        self._closer()

    def fetch(self, url: str, *, task_id: int | None = None) -> Image.Image:
        """The image at `url` (a task's `data.<image>` value) as an EXIF-transposed RGB image; raises MediaError."""
        if not isinstance(url, str) or not url.strip():
            raise MediaError("the image URL is empty", field="url")
        url = url.strip()
        return decode_image(self.fetch_bytes(url, task_id=task_id), max_pixels=self.max_pixels, source=_short(url))

    def fetch_bytes(self, url: str, *, task_id: int | None = None) -> bytes:
        """The raw bytes behind `url` (same resolution and checks as `fetch`, without decoding)."""
        scheme = urlsplit(url).scheme.lower()
        if scheme in CLOUD_SCHEMES:
            return self._presigned(url, task_id)
        if scheme in ("http", "https"):
            if not self.is_allowed(url):
                raise MediaError(f"downloading images from {_host(url)} is not allowed: only the Label Studio host "
                                 "and MEDIA_ALLOWED_HOSTS are", status=403, code="media_forbidden", field="url")
            return self._download(url)
        if scheme == "" and url.startswith("/"):
            if urlsplit(url).path.rstrip("/") == "/data/local-files" and self.local_files_root is not None:
                return self._local_file(url)
            return self._from_ls(url)
        raise MediaError(f"unsupported image URL {_short(url)!r}: expected http(s)://, /data/upload/..., "
                         "/data/local-files/?d=..., s3://, gs:// or azure-blob://", field="url")

    # --- sources ------------------------------------------------------------------------------------------------

    def _ls_absolute(self, path: str) -> str:
        if self.ls_url is None:
            raise MediaError(f"{_short(path)!r} is relative to Label Studio, but no Label Studio URL is known: set "
                             "LABEL_STUDIO_URL (or let LS send its hostname at /setup)", field="url")
        return self.ls_url + path

    def _from_ls(self, path: str) -> bytes:
        try:
            return self._download(self._ls_absolute(path))
        except MediaError as error:
            if error.code != "image_not_found" or not path.startswith("/data/upload/"):
                raise
            proxy = "/storage-data/uploaded/?filepath=" + quote(unquote(path.removeprefix("/data/")), safe="/")
            try:
                return self._download(self._ls_absolute(proxy))
            except MediaError as proxy_error:
                if proxy_error.code == "image_not_found":
                    raise error from None
                raise

    def _local_file(self, url: str) -> bytes:
        assert self.local_files_root is not None
        values = parse_qs(urlsplit(url).query).get("d")
        if not values or not values[0].strip():
            raise MediaError(f"{_short(url)!r} has no d=<path> parameter", field="url")
        relative = values[0].lstrip("/")
        try:
            path = (self.local_files_root / relative).resolve()
            inside = path.is_relative_to(self.local_files_root)
            exists = inside and path.is_file()
        except (OSError, ValueError):
            inside = exists = False
        if not inside:
            raise MediaError(f"local file {relative!r} is outside LOCAL_FILES_DOCUMENT_ROOT", status=403,
                             code="media_forbidden", field="url")
        if not exists:
            raise MediaError(f"local file {relative!r} does not exist under LOCAL_FILES_DOCUMENT_ROOT",
                             code="image_not_found", field="url")
        size = path.stat().st_size
        if size > self.max_bytes:
            raise _too_many_bytes(relative, self.max_bytes)
        with path.open("rb") as handle:
            data = handle.read(self.max_bytes + 1)
        if len(data) > self.max_bytes:
            raise _too_many_bytes(relative, self.max_bytes)
        return data

    def _presigned(self, uri: str, task_id: int | None) -> bytes:
        if task_id is None:
            raise MediaError(f"{_short(uri)!r} is a cloud storage URI; presigning it through Label Studio needs "
                             "the task id", field="url")
        fileuri = base64.urlsafe_b64encode(uri.encode()).decode()
        presign = self._ls_absolute(f"/tasks/{int(task_id)}/presign/?fileuri={quote(fileuri)}")
        return self._download(presign, trusted_first_redirect=True)

    # --- HTTP ---------------------------------------------------------------------------------------------------

    def is_allowed(self, url: str) -> bool:
        """True when `url` is on the LS origin or an allowed host (the check every download and redirect passes)."""
        target = origin(url)
        if target is None:
            return False
        if (self.auth is not None and self.auth.is_ls_url(url)) or (self.ls_url and origin(self.ls_url) == target):
            return True
        _, host, port = target
        for entry in self.allowed_hosts:
            if entry.startswith("*."):
                if host == entry[2:] or host.endswith(entry[1:]):
                    return True
            elif entry == host or entry == f"{host}:{port}":
                return True
        return False

    def _download(self, url: str, *, trusted_first_redirect: bool = False) -> bytes:
        deadline = time.monotonic() + self.timeout
        retried_auth = False
        hops = 0
        while True:
            headers = self.auth.headers_for(url) if self.auth is not None else {}
            try:
                with self._client.stream("GET", url, headers=headers) as response:
                    status = response.status_code
                    if status in (301, 302, 303, 307, 308) and "location" in response.headers:
                        location = urljoin(url, response.headers["location"])
                    elif status == 401 and headers and self.auth is not None and self.auth.is_pat and not retried_auth:
                        location = None
                    elif 200 <= status < 300:
                        return self._read(response, url, deadline)
                    else:
                        raise self._status_error(status, url, bool(headers))
            except httpx.TimeoutException:
                raise MediaError(f"downloading {_short(url)} timed out after {self.timeout:g} s", status=502,
                                 code="media_timeout", field="url") from None
            except httpx.HTTPError as error:
                detail = str(error).replace(url, _short(url))  # keep presigned signatures out of the message
                raise MediaError(f"cannot download {_short(url)}: {type(error).__name__}: {detail}", status=502,
                                 code="media_unreachable", field="url") from None
            if location is None:  # an expired access token: refresh once and retry
                self.auth.invalidate()  # type: ignore[union-attr]
                retried_auth = True
                continue
            hops += 1
            if hops > MAX_REDIRECTS:
                raise MediaError(f"more than {MAX_REDIRECTS} redirects downloading {_short(url)}", status=502,
                                 code="media_unreachable", field="url")
            trusted_next = trusted_first_redirect and hops == 1
            if origin(location) is None or not (trusted_next or self.is_allowed(location)):
                raise MediaError(f"{_short(url)} redirects to {_host(location)}, which is not allowed (only the "
                                 "Label Studio host and MEDIA_ALLOWED_HOSTS are)", status=403, code="media_forbidden",
                                 field="url")
            url = location
            if time.monotonic() > deadline:
                raise MediaError(f"downloading {_short(url)} timed out after {self.timeout:g} s", status=502,
                                 code="media_timeout", field="url")

    def _read(self, response: httpx.Response, url: str, deadline: float) -> bytes:
        declared = response.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_bytes:
            raise _too_many_bytes(_short(url), self.max_bytes)
        buffer = bytearray()
        for chunk in response.iter_bytes(_CHUNK):
            buffer += chunk
            if len(buffer) > self.max_bytes:
                raise _too_many_bytes(_short(url), self.max_bytes)
            if time.monotonic() > deadline:
                raise MediaError(f"downloading {_short(url)} timed out after {self.timeout:g} s", status=502,
                                 code="media_timeout", field="url")
        return bytes(buffer)

    def _status_error(self, status: int, url: str, sent_credentials: bool) -> MediaError:
        where = _short(url)
        if status in (401, 403):
            hint = ("Label Studio refused our credentials: check LABEL_STUDIO_API_KEY" if sent_credentials else
                    "no credentials were sent: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY"
                    if self.auth is None else "the host refused access")
            return MediaError(f"HTTP {status} downloading {where}: {hint}", status=502, code="media_unauthorized",
                              field="url")
        if status in (404, 410):
            return MediaError(f"HTTP {status} downloading {where}: the image does not exist", code="image_not_found",
                              field="url")
        return MediaError(f"HTTP {status} downloading {where}", status=502, code="media_unreachable", field="url")


def decode_image(data: bytes, *, max_pixels: int, source: str = "image") -> Image.Image:
    """Decode image bytes to an EXIF-transposed 8-bit RGB image; MediaError for non-images, corrupt or huge ones."""
    if not data:
        raise MediaError(f"{source} is empty (0 bytes)", field="url")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own max_pixels check decides
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise MediaError(f"{source} is {width}x{height} = {width * height:,} pixels, more than the limit of "
                                 f"{max_pixels:,} (MAX_IMAGE_PIXELS)", code="image_too_large", field="url")
            image.seek(0)
            image.load()
            image = ImageOps.exif_transpose(image)
    except MediaError:
        raise
    except Image.DecompressionBombError as error:
        raise MediaError(f"{source} is too large to decode safely: {error}", code="image_too_large",
                         field="url") from None
    except UnidentifiedImageError:
        known = next((name for magic, name in _SIGNATURES if data.startswith(magic)), None)
        if known:
            raise MediaError(f"{source} is a corrupt or truncated {known} image", field="url") from None
        raise MediaError(f"{source} is not an image Pillow can read (starts with {data[:12]!r})",
                         field="url") from None
    except (OSError, ValueError, SyntaxError, EOFError) as error:
        raise MediaError(f"{source} is a corrupt or truncated image: {error}", field="url") from None
    return _to_rgb(image)


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        scale = 257.0 if mode != "I" or values.max(initial=0) > 255 else 1.0
        return Image.fromarray(np.clip(values / scale, 0, 255).astype(np.uint8)).convert("RGB")
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        values = values * 255 if values.max(initial=0) <= 1.0 else values
        return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8)).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB") if mode != "RGB" else image


def _too_many_bytes(what: str, limit: int) -> MediaError:
    return MediaError(f"{what} is larger than the limit of {limit:,} bytes (MAX_IMAGE_BYTES)", code="image_too_large",
                      field="url")


def _host(url: str) -> str:
    target = origin(url)
    return f"{target[1]}:{target[2]}" if target else repr(_short(url))


def _short(url: str) -> str:
    """The URL without its query (presigned signatures stay out of messages and logs), at most 200 characters."""
    parts = urlsplit(url)
    if parts.scheme in ("http", "https") and parts.query and parts.path.rstrip("/") != "/data/local-files":
        url = url.split("?", 1)[0] + "?…"
    return url if len(url) <= 200 else url[:199] + "…"
