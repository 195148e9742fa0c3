"""Routing: the consistent-hash ring (Rust core) that places keys on nodes.

``HashRing`` places keys exactly as libketama and uhashring's ketama mode do, so a user of
either can switch without moving data.
"""

from buttress._core import HashRing

__all__ = ["HashRing"]
