from tests.scale.support import spawn

__all__ = ["spawn"]
