"""Video data: folder listing, official clip sampling and transform, parallel decoding."""

import logging


class _WithoutGrainProfilingNotice(logging.Filter):
    """Drops the one line grain >= 0.2.17 logs as it is imported when jaxlib is older than
    0.10.1 (an extension version under 448): that profiling its reading processes needs a newer
    jaxlib. stam-jax does not profile them, and every command that read a prepared dataset
    printed it. Set here, before any module of this package can import grain (or tfds, which may
    import it); nothing else is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        """False for grain's notice alone."""
        return not str(record.msg).startswith("Grain multiprocess worker profiling requires")


logging.getLogger("absl").addFilter(_WithoutGrainProfilingNotice())
