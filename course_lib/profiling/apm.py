"""Vendor-neutral APM with OpenTelemetry: spans of a request, kept in memory.

- :func:`traced`: a decorator that runs each call of the function in a span named after it,
  what ``newrelic.agent.background_task()`` does for New Relic (plain and ``async``
  functions, generators and async generators: the span lasts for the iteration). Without
  :func:`tracing` (or another OpenTelemetry SDK set up) its spans are the API's no-ops and
  cost almost nothing.
- :func:`tracing`: a context manager. On first use in a process it installs one
  OpenTelemetry SDK ``TracerProvider`` with an in-memory exporter; if the process already has
  an SDK provider (the application set one up), the exporter is added to that one instead. A
  provider is never replaced: OpenTelemetry allows setting it once per process. For the block
  it instruments redis-py (every client, existing or new) and the SQLAlchemy engines passed
  in ``engines``, and on exit it uninstruments them; it yields a list that fills with each
  span as it finishes, from any thread.

**SQLAlchemy 2.1.** opentelemetry-instrumentation-sqlalchemy declares ``sqlalchemy >= 1.0.0,
< 2.1.0`` while the course installs SQLAlchemy 2.1. With the dependency check on,
``SQLAlchemyInstrumentor().instrument()`` logs an error and silently instruments nothing (no
database span, no exception). The course does not pin SQLAlchemy below 2.1 (every other topic
uses it); :func:`tracing` instruments with ``skip_dep_check=True``. The instrumentation hooks
SQLAlchemy's stable public event API (``before_cursor_execute`` / ``after_cursor_execute``),
which 2.1 keeps. One dependency was missing: the instrumentation wraps (and on exit unwraps)
``sqlalchemy.ext.asyncio.create_async_engine``, and importing that module needs greenlet,
which SQLAlchemy 2.1 no longer installs; the course's requirements add ``greenlet``. The
tests fail if no database span carrying the SQL statement appears, so a future release that
breaks this is caught. Engines must be passed explicitly: the instrumentation's wrapper of
``create_engine`` cannot reach code that imported ``create_engine`` before the block (as
:mod:`course_lib.services` does).

Blocks may nest and may overlap across threads: the first block to enter instruments, the
last to exit uninstruments, and every open block's list receives every span that finishes
meanwhile. Engines are instrumented by the outermost block only (a nested block naming a new
engine raises ``ValueError``, because the instrumentation cannot remove one engine's
listeners without removing all of them). Instrumentation the process set up itself (say with
``opentelemetry-instrument``) is left as it is: :func:`tracing` neither repeats nor removes it.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import AsyncGenerator, Callable, Generator, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import Status, StatusCode
from sqlalchemy import Engine

__all__ = ["TRACER_NAME", "traced", "tracing"]

TRACER_NAME = "course_lib.profiling"
F = TypeVar("F", bound=Callable[..., Any])


def traced(name: str | None = None) -> Callable[[F], F]:
    """Decorator: each call runs in a span called ``name`` (default: the function's
    qualified name); an exception is recorded on the span (an ``exception`` event, status
    ``ERROR``) and re-raised. Spans nest: a traced function called inside another's span is
    its child.

    Works on plain and ``async`` functions, and on generators and async generators: their
    span starts at the first item asked for and ends when the iteration does (exhausted,
    raised, or closed early, which is not an error), so it lasts as long as the body runs.
    The span is the current one only while the body runs, so spans started in the body are
    its children and spans the consumer starts between two items are not.
    """
    if callable(name):
        raise TypeError("traced takes a span name, not a function: write @traced()")
    if name is not None and (not isinstance(name, str) or not name):
        raise TypeError(f"name must be a non-empty str or None, got {name!r}")

    def decorate(fn: F) -> F:
        span_name = name or fn.__qualname__
        attributes = {"code.function": fn.__qualname__, "code.namespace": fn.__module__}
        tracer = trace.get_tracer(TRACER_NAME)  # a proxy until a provider is installed

        if inspect.isgeneratorfunction(fn):
            return _traced_generator(fn, tracer, span_name, attributes)  # type: ignore[return-value]
        if inspect.isasyncgenfunction(fn):
            return _traced_async_generator(fn, tracer, span_name, attributes)  # type: ignore[return-value]
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                with tracer.start_as_current_span(span_name, attributes=attributes):
                    return await fn(*args, **kwargs)

            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with tracer.start_as_current_span(span_name, attributes=attributes):
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def _failed(span: trace.Span, exc: BaseException) -> None:
    """What ``start_as_current_span`` does with an exception that leaves its block."""
    span.record_exception(exc)
    span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))


def _traced_generator(
    fn: Callable[..., Generator[Any, Any, Any]],
    tracer: trace.Tracer,
    span_name: str,
    attributes: dict[str, str],
) -> Callable[..., Generator[Any, Any, Any]]:
    @functools.wraps(fn)
    def generator_wrapper(*args: Any, **kwargs: Any) -> Generator[Any, Any, Any]:
        span = tracer.start_span(span_name, attributes=attributes)
        body_context = trace.set_span_in_context(span)
        steps = fn(*args, **kwargs)
        sent: Any = None
        thrown: BaseException | None = None
        try:
            while True:  # what `yield from steps` does, with the span current for each step
                token = otel_context.attach(body_context)
                try:
                    item = steps.send(sent) if thrown is None else steps.throw(thrown)
                finally:
                    otel_context.detach(token)
                try:
                    sent, thrown = (yield item), None
                except GeneratorExit:
                    raise
                except BaseException as exc:  # consumer's throw(): handed on to the body
                    sent, thrown = None, exc
        except StopIteration as done:
            return done.value
        except GeneratorExit:  # closed early by the consumer: not an error
            token = otel_context.attach(body_context)
            try:
                steps.close()
            finally:
                otel_context.detach(token)
            raise
        except BaseException as exc:
            _failed(span, exc)
            raise
        finally:
            span.end()

    return generator_wrapper


def _traced_async_generator(
    fn: Callable[..., AsyncGenerator[Any, Any]],
    tracer: trace.Tracer,
    span_name: str,
    attributes: dict[str, str],
) -> Callable[..., AsyncGenerator[Any, Any]]:
    @functools.wraps(fn)
    async def async_generator_wrapper(*args: Any, **kwargs: Any) -> AsyncGenerator[Any, Any]:
        span = tracer.start_span(span_name, attributes=attributes)
        body_context = trace.set_span_in_context(span)
        steps = fn(*args, **kwargs)
        sent: Any = None
        thrown: BaseException | None = None
        try:
            while True:  # the same loop as for a generator, with asend/athrow/aclose
                token = otel_context.attach(body_context)
                try:
                    item = await (steps.asend(sent) if thrown is None else steps.athrow(thrown))
                finally:
                    otel_context.detach(token)
                try:
                    sent, thrown = (yield item), None
                except GeneratorExit:
                    raise
                except BaseException as exc:
                    sent, thrown = None, exc
        except StopAsyncIteration:
            return
        except GeneratorExit:
            token = otel_context.attach(body_context)
            try:
                await steps.aclose()
            finally:
                otel_context.detach(token)
            raise
        except BaseException as exc:
            _failed(span, exc)
            raise
        finally:
            span.end()

    return async_generator_wrapper


class _LiveExporter(SpanExporter):
    """Appends every exported span to each open :func:`tracing` block's list."""

    def __init__(self) -> None:
        self._sinks: list[list[ReadableSpan]] = []
        self._lock = threading.Lock()

    def add(self, sink: list[ReadableSpan]) -> None:
        with self._lock:
            self._sinks.append(sink)

    def remove(self, sink: list[ReadableSpan]) -> None:
        with self._lock:
            self._sinks = [s for s in self._sinks if s is not sink]

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self._lock:
            for sink in self._sinks:
                sink.extend(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            self._sinks = []


_lock = threading.Lock()
_exporter: _LiveExporter | None = None
_open_blocks = 0
_engines: list[Engine] = []
_instrumentors: list[Any] = []


def _install() -> _LiveExporter:
    """The process's one in-memory exporter, installed on first use."""
    global _exporter
    if _exporter is None:
        provider = trace.get_tracer_provider()
        if not isinstance(provider, TracerProvider):  # the API's default proxy: no SDK yet
            trace.set_tracer_provider(
                TracerProvider(resource=Resource.create({"service.name": "perf-course"}))
            )
            provider = trace.get_tracer_provider()  # whoever won a race to set it
        if not isinstance(provider, TracerProvider):
            raise RuntimeError(
                f"the process's tracer provider is a {type(provider).__name__}, not the "
                "OpenTelemetry SDK's TracerProvider: cannot add an in-memory exporter to it"
            )
        exporter = _LiveExporter()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        _exporter = exporter
    return _exporter


def _instrument(engines: Sequence[Engine]) -> None:
    from opentelemetry.instrumentation.redis import RedisInstrumentor
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

    redis_instrumentor = RedisInstrumentor()
    if not redis_instrumentor.is_instrumented_by_opentelemetry:
        redis_instrumentor.instrument()
        _instrumentors.append(redis_instrumentor)
    sqlalchemy_instrumentor = SQLAlchemyInstrumentor()
    if engines and not sqlalchemy_instrumentor.is_instrumented_by_opentelemetry:
        # skip_dep_check: the instrumentation declares sqlalchemy<2.1 (module docstring)
        sqlalchemy_instrumentor.instrument(engines=list(engines), skip_dep_check=True)
        _instrumentors.append(sqlalchemy_instrumentor)
        _engines.extend(engines)


def _uninstrument() -> None:
    while _instrumentors:
        _instrumentors.pop().uninstrument()
    _engines.clear()


@contextmanager
def tracing(*, engines: Sequence[Engine] = ()) -> Iterator[list[ReadableSpan]]:
    """Trace the block: yields the live list of finished spans (see the module docstring)."""
    global _open_blocks
    engines = list(engines)
    for engine in engines:
        if not isinstance(engine, Engine):
            raise TypeError(f"engines must hold SQLAlchemy Engines, got {type(engine).__name__}")
    spans: list[ReadableSpan] = []
    with _lock:
        exporter = _install()
        if _open_blocks and any(all(e is not k for k in _engines) for e in engines):
            raise ValueError(
                "engines: a nested tracing() block cannot add an engine; pass every engine "
                "to the outermost block"
            )
        if not _open_blocks:
            try:
                _instrument(engines)
            except BaseException:
                _uninstrument()  # never leave half of the instrumentation behind
                raise
        _open_blocks += 1
        exporter.add(spans)
    try:
        yield spans
    finally:
        with _lock:
            exporter.remove(spans)
            _open_blocks -= 1
            if not _open_blocks:
                _uninstrument()
