"""A real uvicorn server in a background thread of the test process, on a free loopback port:
the same ServerThread the apps' in-process backend uses."""

from sorai.server.local import ServerThread

__all__ = ["ServerThread"]
