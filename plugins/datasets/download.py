"""Downloads that leave a verified file or nothing."""

import hashlib
import os
import urllib.request
from pathlib import Path

from tqdm import tqdm

import ddiff


def download(url: str, destination: Path, md5: str, what: str) -> None:
    """Fetch ``url`` to ``destination`` with a progress bar and check its MD5.

    The bytes go to a temporary file beside the destination, renamed into place only
    when complete and verified, so an interrupted download leaves nothing behind.
    """
    destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = destination.with_name(f".{destination.name}.part-{os.getpid()}")
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(temporary, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=destination.name) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except (OSError, ValueError) as error:
        temporary.unlink(missing_ok=True)
        reason = getattr(error, "reason", None) or error
        raise ddiff.DataError(
            f"{what}: {destination} is missing and downloading it from {url} failed "
            f"({reason}); download it by hand and put it at {destination}, or set data.root "
            f"to the directory that holds it"
        ) from None
    if digest.hexdigest() != md5:
        temporary.unlink(missing_ok=True)
        raise ddiff.DataError(
            f"{what}: the file downloaded from {url} has MD5 {digest.hexdigest()}, expected "
            f"{md5}; nothing was saved, try again or put a good copy at {destination}"
        )
    os.replace(temporary, destination)
