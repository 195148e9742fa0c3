"""Lazy loading: values, collections and properties that load once, even under concurrency.

A failure is never cached: the next access runs the loader again. Each sync form has an
asyncio twin that loads once per value, whichever tasks ask for it at the same time.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Awaitable, Callable, Coroutine, Generator, Iterator, Sequence
from typing import Any, Generic, TypeVar, cast, overload

__all__ = ["AsyncLazy", "AsyncLazyCollection", "Lazy", "LazyCollection", "lazy_property"]

T = TypeVar("T")
Owner = TypeVar("Owner")


class _Unset:
    """The marker of a value not loaded yet (a class, so `is` checks stay cheap)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<not loaded>"


_UNSET: Any = _Unset()


def _check_loader(loader: object) -> None:
    if not callable(loader):
        raise TypeError(f"loader must be callable (got {loader!r}).")


class Lazy(Generic[T]):
    """A value computed on first use, exactly once however many threads ask at the same time.

    A loader that raises caches nothing: the error reaches the callers of that attempt and the
    next access tries again.

    >>> config = Lazy(lambda: {"retries": 3})
    >>> config.loaded
    False
    >>> config.get()["retries"]
    3
    >>> config.loaded
    True
    """

    __slots__ = ("_loader", "_lock", "_value")

    def __init__(self, loader: Callable[[], T]) -> None:
        _check_loader(loader)
        self._loader = loader
        # One field holds the marker or the value, so a reader sees one or the other, never a
        # half-published state (also without the GIL).
        self._value: T = _UNSET
        # Held only while loading; readers of a loaded value never touch it.
        self._lock = threading.Lock()

    def get(self) -> T:
        """The value, loading it first if no call has loaded it yet."""
        value = self._value
        if value is not _UNSET:
            return value
        with self._lock:
            value = self._value
            if value is _UNSET:
                value = self._loader()
                self._value = value
            return value

    __call__ = get

    @property
    def loaded(self) -> bool:
        """True once a load succeeded (and `reset()` has not been called since)."""
        return self._value is not _UNSET

    def reset(self) -> None:
        """Forgets the value; the next access loads it again."""
        with self._lock:
            self._value = _UNSET

    def __repr__(self) -> str:
        return f"Lazy({self._value!r})"


class AsyncLazy(Generic[T]):
    """The asyncio twin of `Lazy`: ``await lazy.get()`` (or ``await lazy``) runs the coroutine
    function once, however many tasks ask at the same time.

    The load runs in a task of its own, so one cancelled caller does not cancel it for the
    others. A load that raises caches nothing: its error reaches the callers waiting on that
    attempt and the next access tries again.

    >>> import asyncio
    >>> async def fetch() -> int:
    ...     return 42
    >>> answer = AsyncLazy(fetch)
    >>> asyncio.run(answer.get())
    42
    """

    __slots__ = ("_load", "_loader", "_value")

    def __init__(self, loader: Callable[[], Awaitable[T]]) -> None:
        _check_loader(loader)
        self._loader = loader
        self._value: T = _UNSET
        self._load: asyncio.Task[T] | None = None

    async def get(self) -> T:
        """The value, loading it first if no call has loaded it yet."""
        value = self._value
        if value is not _UNSET:
            return value
        load = self._load
        if load is None or (load.done() and (load.cancelled() or load.exception() is not None)):
            load = asyncio.ensure_future(self._run())
            self._load = load
        return await asyncio.shield(load)

    async def _run(self) -> T:
        try:
            value = await self._loader()
        except BaseException:
            self._load = None  # the next access starts a fresh attempt
            raise
        self._value = value
        return value

    def __await__(self) -> Generator[Any, None, T]:
        return self.get().__await__()

    @property
    def loaded(self) -> bool:
        """True once a load succeeded (and `reset()` has not been called since)."""
        return self._value is not _UNSET

    def reset(self) -> None:
        """Forgets the value; the next access loads it again."""
        self._value = _UNSET
        self._load = None

    def __repr__(self) -> str:
        return f"AsyncLazy({self._value!r})"


class LazyCollection(Sequence[T]):
    """A read-only sequence whose items are loaded on first use, once.

    >>> rows = LazyCollection(lambda: [1, 2, 3])
    >>> len(rows), rows[0], list(rows)
    (3, 1, [1, 2, 3])
    """

    __slots__ = ("_items",)

    def __init__(self, loader: Callable[[], Sequence[T] | Iterator[T]]) -> None:
        _check_loader(loader)
        self._items: Lazy[tuple[T, ...]] = Lazy(lambda: tuple(loader()))

    @overload
    def __getitem__(self, index: int) -> T: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[T]: ...
    def __getitem__(self, index: int | slice) -> T | Sequence[T]:
        return self._items.get()[index]

    def __len__(self) -> int:
        return len(self._items.get())

    def __iter__(self) -> Iterator[T]:
        return iter(self._items.get())

    @property
    def loaded(self) -> bool:
        """True once the items were loaded."""
        return self._items.loaded

    def reset(self) -> None:
        """Forgets the items; the next access loads them again."""
        self._items.reset()

    def __repr__(self) -> str:
        return f"LazyCollection({list(self) if self.loaded else '<not loaded>'})"


class AsyncLazyCollection(Generic[T]):
    """The asyncio twin of `LazyCollection`: ``await rows.all()`` loads once; ``async for``
    iterates.

    >>> import asyncio
    >>> async def fetch_rows() -> list[int]:
    ...     return [1, 2]
    >>> rows = AsyncLazyCollection(fetch_rows)
    >>> asyncio.run(rows.all())
    (1, 2)
    """

    __slots__ = ("_items",)

    def __init__(self, loader: Callable[[], Awaitable[Sequence[T]]]) -> None:
        _check_loader(loader)

        async def load() -> tuple[T, ...]:
            return tuple(await loader())

        self._items: AsyncLazy[tuple[T, ...]] = AsyncLazy(load)

    async def all(self) -> tuple[T, ...]:
        """Every item, loading them first if needed."""
        return await self._items.get()

    async def __aiter__(self) -> Any:
        for item in await self.all():
            yield item

    @property
    def loaded(self) -> bool:
        """True once the items were loaded."""
        return self._items.loaded

    def reset(self) -> None:
        """Forgets the items; the next access loads them again."""
        self._items.reset()


class lazy_property(Generic[Owner, T]):
    """A cached property that computes once per instance even when threads race for it.

    Once computed, the value lives in the instance's ``__dict__`` under the property's name, so
    reading it costs the same as any attribute (like ``functools.cached_property``). A getter
    that raises caches nothing. On an ``async def`` getter the attribute is an `AsyncLazy`:
    ``await obj.attribute`` loads once per instance. ``del obj.attribute`` forgets the value.

    >>> class Report:
    ...     @lazy_property
    ...     def total(self) -> int:
    ...         return 6 * 7
    >>> Report().total
    42
    """

    def __init__(self, getter: Callable[[Owner], T]) -> None:
        _check_loader(getter)
        self._getter = getter
        self._name = getter.__name__
        self.__doc__ = getter.__doc__
        self._async = inspect.iscoroutinefunction(getter)
        # Guards the per-instance locks below; held for a dictionary operation only.
        self._locks_guard = threading.Lock()
        self._locks: dict[int, threading.Lock] = {}

    def __set_name__(self, owner: type[Owner], name: str) -> None:
        self._name = name

    @overload
    def __get__(
        self, instance: None, owner: type[Owner] | None = None
    ) -> lazy_property[Owner, T]: ...
    @overload
    def __get__(self, instance: Owner, owner: type[Owner] | None = None) -> T: ...
    def __get__(
        self, instance: Owner | None, owner: type[Owner] | None = None
    ) -> T | lazy_property[Owner, T]:
        if instance is None:
            return self
        namespace = _instance_dict(instance, self._name)
        if self._async:
            getter = cast(Callable[[Owner], Coroutine[Any, Any, Any]], self._getter)
            with self._locks_guard:
                loader = namespace.get(self._name, _UNSET)
                if loader is _UNSET:
                    loader = AsyncLazy(lambda: getter(instance))
                    namespace[self._name] = loader
            return cast(T, loader)
        key = id(instance)
        with self._locks_guard:
            lock = self._locks.setdefault(key, threading.Lock())
        try:
            with lock:
                value = namespace.get(self._name, _UNSET)
                if value is _UNSET:
                    value = self._getter(instance)
                    namespace[self._name] = value
                return cast(T, value)
        finally:
            with self._locks_guard:
                if self._locks.get(key) is lock and not lock.locked():
                    del self._locks[key]


def _instance_dict(instance: object, name: str) -> dict[str, Any]:
    try:
        namespace: dict[str, Any] = instance.__dict__
        return namespace
    except AttributeError:
        raise TypeError(
            f"lazy_property {name!r} needs instances with a __dict__ to cache in; "
            f"{type(instance).__name__} has __slots__ without '__dict__'."
        ) from None
