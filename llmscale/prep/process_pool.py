"""Ordered parallel map over a stream, with a bound on the work in flight."""

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import TypeVar

Batch = TypeVar("Batch")
Result = TypeVar("Result")


def ordered_map(
    function: Callable[[Batch], Result], batches: Iterable[Batch], workers: int
) -> Iterator[Result]:
    """`function(batch)` for every batch, in input order, computed by `workers` processes
    (in this process when `workers` is 1).

    At most two batches per worker are read ahead: `Pool.imap` would read the whole input
    into memory whenever the workers are slower than the reader.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}.")
    if workers == 1:
        yield from map(function, batches)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        pending: deque[Future[Result]] = deque()
        for batch in batches:
            pending.append(pool.submit(function, batch))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
