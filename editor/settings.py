"""One settings object for the server, the CLI and the database layer (listed in README.md).

Values come from keyword arguments, then `EDITOR_*` environment variables, then a `.env` file in
the current directory, then the defaults below. Every limit the API enforces is a field here.
"""

from __future__ import annotations

import ipaddress
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from editor.document import DocumentLimits

Dtype = Literal["auto", "float32", "float16", "bfloat16"]
Framing = Literal["auto", "base", "chat"]
Quantize = Literal["none", "int8", "fp8"]  # editor.models.quantize.Quantize (settings import no torch)
_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


class Settings(BaseSettings):
    """Everything an operator can configure. Environment variables are `EDITOR_<FIELD>`."""

    model_config = SettingsConfigDict(env_prefix="EDITOR_", env_file=".env", extra="ignore", validate_default=True)

    # Storage and model.
    database_url: str = Field(
        "sqlite:///editor.db", description="SQLAlchemy URL; default: editor.db in the working directory"
    )
    database_busy_timeout_s: float = Field(
        30.0,
        gt=0,
        allow_inf_nan=False,
        description="SQLite: how long a write waits for another writer's lock before the request is answered 503",
    )
    model: str | None = Field(
        None, description="'default', 'tiny', a model directory or a Hugging Face id; None = 'default'"
    )
    device: str = Field("auto", description="'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:N' or 'mps'")
    dtype: Dtype = Field(
        "auto",
        description="weights dtype; 'auto' = bfloat16 on GPU and on CPUs with bfloat16 dot products "
        "(AVX512-BF16, AMX), float32 on other CPUs",
    )
    framing: Framing = Field(
        "auto",
        description="how a Dream or LLaDA checkpoint frames a canvas: 'chat' (its chat template), 'base' (as the "
        "reference code frames a base model) or 'auto' (from the hub id or directory name: Instruct/Chat or Base)",
    )
    instruction: str | None = Field(None, description="default instruction for instruct models (the user turn)")
    quantize: Quantize = Field(
        "none",
        description="weights of the transformer blocks' linear layers: 'none' (the dtype's), 'int8' (weight-only, "
        "any device) or 'fp8' (float8 weights and activations; GPUs of compute capability 8.9+, bfloat16); needs "
        "torchao (the `quantize` extra); docs/engine.md",
    )
    cuda_graphs: int = Field(
        48,
        ge=0,
        description="CUDA graphs of the cached window step kept per model (one per batch size, canvas length and "
        "window width bucket, captured the second time a shape is seen); 0: run every step eagerly",
    )
    cuda_graph_slabs: int = Field(
        4,
        ge=1,
        description="(batch, canvas length) shapes whose CUDA graphs keep a static copy of the keys/values (each "
        "as large as one running batch's cache); the least recently used shape is dropped first",
    )

    # Network.
    host: str = Field("127.0.0.1", description="interface to listen on; anything but loopback requires api_token")
    port: int = Field(8000, ge=1, le=65535)
    api_token: SecretStr | None = Field(None, description="bearer token for /api routes (required off loopback)")
    allowed_hosts: list[str] = Field(
        ["localhost", "127.0.0.1", "[::1]"],
        description="Host header values served (DNS-rebinding guard); the host the server binds is added; "
        "'*' allows any, '*.example.org' a domain's subdomains",
    )

    # Limits: exceeding any of them is a 4xx with a message.
    max_document_chars: int = Field(100_000, ge=1, description="characters in a document's source")
    max_spans: int = Field(64, ge=1, description="mask spans per document")
    max_span_tokens: int = Field(512, ge=1, description="tokens in one span")
    max_canvas_tokens: int = Field(4096, ge=8, description="tokens on one canvas (frame + literals + spans)")
    max_steps: int = Field(1024, ge=1, description="most sampler steps a fill may take (the default steps counted)")
    max_batch_rows: int = Field(8, ge=1, description="canvases the worker runs in one sampler call")
    max_batch_tokens: int = Field(
        16384, ge=8, description="canvas positions x rows in one forward pass (batches and choice scoring)"
    )
    max_choice_options: int = Field(16, ge=2, description="options in one choice= span")
    max_choice_tokens: int = Field(64, ge=1, description="tokens in one choice= option")
    fill_timeout_s: float = Field(
        300.0, gt=0, allow_inf_nan=False, description="wall-clock budget of one fill once it runs; then 504"
    )
    shutdown_timeout_s: float = Field(
        5.0, gt=0, allow_inf_nan=False, description="after SIGTERM, how long to wait for responses to finish"
    )
    worker_restarts: int = Field(
        3,
        ge=0,
        description="times in ten minutes a model worker thread that died is replaced; beyond that /ready answers "
        "503 and fills are refused, so that a supervisor restarts the process",
    )
    queue_size: int = Field(32, ge=1, description="fills waiting for the worker; beyond this requests get 429")
    batch_window_ms: float = Field(5.0, ge=0, description="how long the worker waits to gather a batch")
    continuous_batching: bool = Field(
        True,
        description="admit queued fills into the running batch at each step and hand each fill back when its "
        "rows are done; false: a batch runs to its end before the next starts",
    )
    if_match: Literal["never", "browsers", "always"] = Field(
        "browsers",
        description="which PUT, PATCH and DELETE of a document must send If-Match (its ETag) or get 428: "
        "'browsers' (requests with Origin or Sec-Fetch-Mode: a web page's, which must not overwrite another "
        "tab's text unseen), 'always', or 'never'; an If-Match that is sent is always checked (412 when stale)",
    )
    keep_step_trace: bool = Field(True, description="store each revision's step trace (for replay)")
    torch_threads: int = Field(
        0,
        ge=0,
        description="CPU threads of torch in the model worker, `editor fill` and `editor batch` (--threads "
        "overrides it there); 0: one core fewer than the machine has (the event loop or any other process "
        "needs one: two busy threads on two cores made fills under load 6-13x slower), or whatever "
        "OMP_NUM_THREADS says when it is set (Ray sets it per replica)",
    )

    # Ray (README "Running on a Ray cluster"); nothing of Ray is imported unless asked for.
    replicas: int | None = Field(
        None, ge=1, description="model replicas on Ray Serve (one GPU each when the cluster has GPUs); None = no Ray"
    )
    ray_address: str | None = Field(
        None, description="Ray cluster to join ('auto', or host:port of `ray start --head`); None = start a local one"
    )
    ray_app_name: str = Field(
        "editor",
        min_length=1,
        max_length=100,
        pattern=r"^[A-Za-z0-9_-]+$",
        description="the Ray Serve application of this server's replicas; servers sharing one Ray cluster need "
        "different names (a second server with the same name replaces the first one's replicas)",
    )
    ray_batch_workers: int = Field(1, ge=1, description="Ray Data workers (one model each) for `editor batch --ray`")

    # Batch JSON templates (docs/batch.md).
    batch_size: int = Field(16, ge=1, description="records filled together in one sampler call by `editor batch`")
    batch_chunk_rows: int = Field(
        4, ge=1, description="records an API batch job hands the worker at a time (interactive fills go between)"
    )
    batch_max_wait_s: float = Field(
        10.0,
        gt=0,
        description="under steady interactive load, an API batch job still gets one chunk through the worker "
        "at least this often (the running fills pause for it between two steps)",
    )
    batch_lease_s: float = Field(
        300.0,
        gt=0,
        description="how long a front's claim on an API batch job holds without renewal (renewed at every chunk); "
        "after that another `editor serve` on the same database takes the job over",
    )
    max_batch_records: int = Field(100_000, ge=1, description="records in one API batch job")
    max_record_chars: int = Field(100_000, ge=1, description="characters in one input record (JSONL line)")
    max_batch_body_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="size of a POST /api/v1/batches body")

    # The OpenAI-compatible API under /v1 (docs/openai.md).
    max_choices: int = Field(16, ge=1, description="choices one /v1 request may ask for (n times the prompts)")
    chat_max_tokens: int = Field(
        256, ge=1, description="/v1/chat/completions: the answer's token bound when the request sets no max_tokens"
    )

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        base, _, index = value.partition(":")
        if base not in ("auto", "cpu", "cuda", "mps") or (index and (base != "cuda" or not index.isdigit())):
            raise ValueError("device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
        return value

    def document_limits(self) -> DocumentLimits:
        """The parser's limits, taken from these settings."""
        return DocumentLimits(
            max_chars=self.max_document_chars,
            max_spans=self.max_spans,
            max_span_tokens=self.max_span_tokens,
            max_choice_options=self.max_choice_options,
        )

    def hosts_allowed(self) -> list[str]:
        """`allowed_hosts` plus the host the server binds (unless it binds every interface)."""
        hosts = list(self.allowed_hosts)
        bound = self.host if ":" not in self.host or self.host.startswith("[") else f"[{self.host}]"
        if self.host not in ("0.0.0.0", "::", "[::]") and bound not in hosts:
            hosts.append(bound)
        return hosts

    @property
    def is_loopback(self) -> bool:
        """True when the server only listens on the local machine."""
        return is_loopback_host(self.host)

    @property
    def token(self) -> str | None:
        return self.api_token.get_secret_value() if self.api_token is not None else None

    def check_serving(self) -> None:
        """Refuse a configuration that would expose the API without a token."""
        if not self.is_loopback and not self.token:
            raise ValueError(
                f"refusing to listen on {self.host}: off loopback the API needs a token; "
                "set EDITOR_API_TOKEN (or api_token in .env), or listen on 127.0.0.1"
            )


def is_loopback_host(host: str) -> bool:
    """'127.0.0.1', '::1', 'localhost' and friends; '0.0.0.0' and real interfaces are not."""
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


__all__ = ["Settings", "is_loopback_host"]
