"""What the reliability tests feed their own workers (tests.processes.own_worker): a slow job."""
from __future__ import annotations

import io

from PIL import Image


def slow_image() -> bytes:
    """A 1600×1200 JPEG of noise (~1 MB) whose resize to 4000 px PNG keeps a worker busy for seconds
    (the PNG encoder on incompressible pixels): long enough to kill the worker in the middle of it."""
    buf = io.BytesIO()
    Image.effect_noise((1600, 1200), 60).convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


SLOW_QUERY = "width=4000&format=png&enlarge=true"
