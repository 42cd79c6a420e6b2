"""Every environment variable the backend reads, typed and documented, in one place.

Nothing else in `backend/` reads `os.environ`. Secrets are `SecretStr` so they never show up in logs or reprs;
`Settings.describe()` gives a loggable summary with secrets redacted.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import AliasChoices, BeforeValidator, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_CHECKPOINT = "models/evf-demo"
LS_PREDICT_TIMEOUT = 100.0  # Label Studio's ML_TIMEOUT_PREDICT; our deadline must stay below it

def _comma_list(value: object) -> object:
    """"a, b,,c" -> ["a", "b", "c"]; anything else unchanged (for list settings given as one string)."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


CommaList = Annotated[list[str], NoDecode, BeforeValidator(_comma_list)]

# Training from corrections: the recipe's value types (shared by Settings and the per-run overrides of
# backend.corrections.train.TrainingRecipe). Part names are those of evf_sam.train.PARTS.
TrainablePart = Literal["projector", "beit3", "mask_decoder", "prompt_encoder", "image_encoder"]
TrainSteps = Annotated[int, Field(ge=1, le=1_000_000)]
TrainEpochs = Annotated[int, Field(ge=0, le=10_000)]
TrainLr = Annotated[float, Field(gt=0, le=0.1)]
TrainBatchSize = Annotated[int, Field(ge=1, le=4096)]
TrainWarmup = Annotated[float, Field(ge=0, le=0.5)]
TrainParts = Annotated[list[TrainablePart], NoDecode, BeforeValidator(_comma_list)]
Holdout = Annotated[float, Field(gt=0, lt=1)]
MinRecords = Annotated[int, Field(ge=2)]


class Settings(BaseSettings):
    """Backend configuration from the environment (names in capitals, e.g. `REDIS_URL`)."""

    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", populate_by_name=True)

    # --- Label Studio ---------------------------------------------------------------------------------------------
    label_studio_url: str | None = Field(
        None, validation_alias=AliasChoices("LABEL_STUDIO_URL", "LABEL_STUDIO_HOST"),
        description="Base URL of Label Studio (http(s)://host:port); relative media URLs are resolved against it "
                    "and LS credentials are only ever sent to this host.")
    label_studio_api_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("LABEL_STUDIO_API_KEY", "LABEL_STUDIO_ACCESS_TOKEN"),
        description="Legacy token or Personal Access Token used to download task images from Label Studio.")

    # --- model ----------------------------------------------------------------------------------------------------
    evf_sam_checkpoint: str = Field(
        DEMO_CHECKPOINT, validation_alias="EVF_SAM_CHECKPOINT",
        description="Checkpoint directory or Hugging Face repo id (default: the shipped demo model).")
    evf_sam_device: str = Field("auto", validation_alias="EVF_SAM_DEVICE",
                                description='"auto" (cuda when available, else cpu), "cpu", "cuda", "cuda:1", ...')
    evf_sam_dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", validation_alias="EVF_SAM_DTYPE",
        description='"auto": bfloat16 on CUDA (the fast path), float32 on CPU; or "float32", "bfloat16", "float16".')
    evf_sam_preprocess: Literal["auto", "cpu", "device"] = Field(
        "auto", validation_alias="EVF_SAM_PREPROCESS",
        description='Where images are resized and normalised: "auto" (on the GPU when the model is on CUDA: uint8 '
                    'uploads; else CPU), "cpu" (the reference path) or "device" (the model\'s device).')
    evf_sam_fused_attention: Literal["auto", "on", "off"] = Field(
        "auto", validation_alias="EVF_SAM_FUSED_ATTENTION",
        description='SAM-1 ViT attention through one fused SDPA kernel (same results, less memory traffic): "auto" '
                    '(on when the model is on CUDA), "on" or "off".')
    evf_sam_prompt_graphs: Literal["auto", "on", "off"] = Field(
        "off", validation_alias="EVF_SAM_PROMPT_GRAPHS",
        description='A new prompt on a cached image through CUDA graphs of BEiT-3 + mask decoder (same results, far '
                    'fewer kernel launches; each new prompt-count/text-length bucket is captured once): "off" '
                    '(default until it has been verified on a GPU, docs/PERFORMANCE.md), "auto" (on when the model '
                    'is on CUDA), "on" (CUDA only; elsewhere eager).')
    evf_sam_compile: bool = Field(
        False, validation_alias="EVF_SAM_COMPILE",
        description="torch.compile the SAM image encoder (faster on GPUs; each new image batch size compiles once, "
                    "tens of seconds for full-size models).")
    embedding_cache_size: int = Field(32, ge=0, validation_alias="EMBEDDING_CACHE_SIZE",
                                      description="Image embeddings kept per worker (LRU) so new prompts skip the encoder.")
    image_batch_size: int = Field(8, ge=1, validation_alias="IMAGE_BATCH_SIZE",
                                  description="Images per image-encoder pass.")
    prompt_batch_size: int = Field(64, ge=1, validation_alias="PROMPT_BATCH_SIZE",
                                   description="Prompts per BEiT-3/decoder pass.")

    # --- HTTP server ----------------------------------------------------------------------------------------------
    host: str = Field("0.0.0.0", validation_alias="HOST")
    port: int = Field(9090, ge=1, le=65535, validation_alias="PORT")
    basic_auth_user: str | None = Field(None, validation_alias="BASIC_AUTH_USER")
    basic_auth_pass: SecretStr | None = Field(None, validation_alias="BASIC_AUTH_PASS")
    webhook_secret: SecretStr | None = Field(
        None, validation_alias="WEBHOOK_SECRET",
        description="When set, /webhook requires this value in the WEBHOOK_SECRET_HEADER header.")
    webhook_secret_header: str = Field("X-Webhook-Secret", validation_alias="WEBHOOK_SECRET_HEADER")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", validation_alias="LOG_LEVEL")

    # --- queueing -------------------------------------------------------------------------------------------------
    redis_url: SecretStr | None = Field(
        None, validation_alias="REDIS_URL",
        description="redis://[:password@]host:port/db. Unset: embedded mode (jobs run in the server process).")
    redis_key_prefix: str = Field("evf", validation_alias="REDIS_KEY_PREFIX",
                                  description="Prefix of the backend's own Redis keys (project state, model registry).")
    queue_interactive: str = Field("interactive", validation_alias="QUEUE_INTERACTIVE",
                                   description="Queue served first: interactive calls and small /predict batches.")
    queue_batch: str = Field("batch", validation_alias="QUEUE_BATCH", description="Queue for big batches and webhooks.")
    interactive_max_tasks: int = Field(
        4, ge=1, validation_alias="INTERACTIVE_MAX_TASKS",
        description="/predict calls with at most this many tasks go to the interactive queue.")
    predict_timeout: float = Field(
        90.0, gt=0, lt=LS_PREDICT_TIMEOUT, validation_alias="PREDICT_TIMEOUT",
        description="Seconds /predict waits for its jobs; unfinished tasks get an empty prediction.")
    job_timeout: int = Field(300, ge=1, validation_alias="JOB_TIMEOUT", description="Seconds one job may run.")
    job_retries: int = Field(2, ge=0, validation_alias="JOB_RETRIES",
                             description="Retries after a transient failure or a dead worker (not after bad input).")
    result_ttl: int = Field(600, ge=1, validation_alias="RESULT_TTL", description="Seconds job results stay in Redis.")
    failure_ttl: int = Field(7 * 24 * 3600, ge=1, validation_alias="FAILURE_TTL",
                             description="Seconds failed jobs (with their reason) stay in Redis.")
    embedded_queue_size: int = Field(1000, ge=1, validation_alias="EMBEDDED_QUEUE_SIZE",
                                     description="Embedded mode: jobs waiting at most; more -> 503.")
    worker_heartbeat_interval: float = Field(
        5.0, gt=0, validation_alias="WORKER_HEARTBEAT_INTERVAL",
        description="Seconds between a busy worker's heartbeats.")
    worker_abandoned_after: int = Field(
        20, ge=2, validation_alias="WORKER_ABANDONED_AFTER",
        description="A running job whose worker sent no heartbeat for this long is retried by another worker.")
    worker_maintenance_interval: int = Field(
        10, ge=1, validation_alias="WORKER_MAINTENANCE_INTERVAL",
        description="Seconds between a worker's checks for abandoned jobs.")
    worker_poll_seconds: int = Field(5, ge=1, validation_alias="WORKER_POLL_SECONDS",
                                     description="Longest an idle worker blocks on Redis before its maintenance.")
    worker_batch_jobs: int = Field(
        8, ge=1, validation_alias="WORKER_BATCH_JOBS",
        description="Predict jobs a worker (or the embedded server) runs through the model together: after taking "
                    "one it takes up to this many ready ones (interactive first). 1: one job at a time.")
    worker_batch_wait_ms: float = Field(
        5.0, ge=0, le=10_000, validation_alias="WORKER_BATCH_WAIT_MS",
        description="Milliseconds a worker waits for more jobs when fewer than WORKER_BATCH_JOBS are ready.")
    worker_threads: int = Field(
        4, ge=1, validation_alias="WORKER_THREADS",
        description="Threads per worker that download and decode the images and encode the masks of a batch.")

    # --- media ----------------------------------------------------------------------------------------------------
    local_files_document_root: Path | None = Field(
        None, validation_alias="LOCAL_FILES_DOCUMENT_ROOT",
        description="Read /data/local-files/?d=... from this directory instead of downloading it.")
    media_allowed_hosts: CommaList = Field(
        default_factory=list, validation_alias="MEDIA_ALLOWED_HOSTS",
        description="Comma-separated extra hosts images may be downloaded from.")
    max_image_bytes: int = Field(50 * 2**20, ge=1, validation_alias="MAX_IMAGE_BYTES")
    max_image_pixels: int = Field(50_000_000, ge=1, validation_alias="MAX_IMAGE_PIXELS")
    media_timeout: float = Field(20.0, gt=0, validation_alias="MEDIA_TIMEOUT", description="Seconds per download.")

    # --- prompts and masks ----------------------------------------------------------------------------------------
    prompt_field: str = Field("prompt", validation_alias="PROMPT_FIELD",
                              description="Task data key holding per-task prompts.")
    max_prompt_length: int = Field(300, ge=1, validation_alias="MAX_PROMPT_LENGTH",
                                   description="Longer prompts are rejected (422 / failed task).")
    max_prompts_per_task: int = Field(32, ge=1, validation_alias="MAX_PROMPTS_PER_TASK")
    mask_mode: Literal["semantic", "instances"] = Field(
        "semantic", validation_alias="MASK_MODE",
        description='"semantic": one region per prompt; "instances": one region per connected component.')
    mask_min_area: int = Field(0, ge=0, validation_alias="MASK_MIN_AREA",
                               description="Drop connected components smaller than this many pixels.")
    mask_fill_holes: int = Field(0, ge=0, validation_alias="MASK_FILL_HOLES",
                                 description="Fill holes smaller than this many pixels.")
    max_instances: int = Field(20, ge=1, validation_alias="MAX_INSTANCES",
                               description="Instances mode: at most this many regions per prompt (largest first).")

    # --- bulk pre-labelling -------------------------------------------------------------------------------------
    auto_prelabel: bool = Field(False, validation_alias="AUTO_PRELABEL",
                                description="Pre-label tasks as they are imported (TASKS_CREATED webhook); per project "
                                            'also with extra_params {"auto_prelabel": true}.')

    # --- corrections ----------------------------------------------------------------------------------------------
    corrections_dir: Path = Field(Path("corrections"), validation_alias="CORRECTIONS_DIR",
                                  description="Dataset directory where annotators' corrections are collected.")
    checkpoints_dir: Path = Field(Path("checkpoints"), validation_alias="CHECKPOINTS_DIR",
                                  description="Where checkpoints fine-tuned on the corrections and the training "
                                              "decisions (training.json) are written.")
    corrections_train_steps: TrainSteps = Field(
        200, validation_alias="CORRECTIONS_TRAIN_STEPS",
        description="Optimizer steps of a training run from corrections (unless CORRECTIONS_TRAIN_EPOCHS is set).")
    corrections_train_epochs: TrainEpochs = Field(
        0, validation_alias="CORRECTIONS_TRAIN_EPOCHS",
        description="When > 0: passes over the training corrections instead of CORRECTIONS_TRAIN_STEPS.")
    corrections_train_lr: TrainLr = Field(1e-4, validation_alias="CORRECTIONS_TRAIN_LR",
                                          description="Peak learning rate (AdamW, warm-up then cosine decay).")
    corrections_train_batch_size: TrainBatchSize = Field(8, validation_alias="CORRECTIONS_TRAIN_BATCH_SIZE",
                                                         description="Prompts per optimizer step.")
    corrections_train_warmup: TrainWarmup = Field(
        0.1, validation_alias="CORRECTIONS_TRAIN_WARMUP",
        description="Linear warm-up as a fraction of the run's steps (0 to 0.5).")
    corrections_train_parts: TrainParts = Field(
        default_factory=list, validation_alias="CORRECTIONS_TRAIN_PARTS",
        description="Comma-separated trainable parts among projector, beit3, mask_decoder, prompt_encoder, "
                    "image_encoder; unset: the paper's recipe (SAM-1: projector,beit3,mask_decoder; SAM-2: "
                    "projector,beit3; the image encoder stays frozen).")
    corrections_holdout: Holdout = Field(
        0.2, validation_alias="CORRECTIONS_HOLDOUT",
        description="Share of corrected images held out (by image hash) to compare the models before promotion.")
    corrections_min_records: MinRecords = Field(
        8, validation_alias="CORRECTIONS_MIN_RECORDS", description="Training refuses to run on fewer corrections.")

    @field_validator("label_studio_url")
    @classmethod
    def _check_ls_url(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError("LABEL_STUDIO_URL must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("redis_url", "label_studio_api_key", "basic_auth_pass", "webhook_secret", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @model_validator(mode="after")
    def _check_auth_pair(self) -> Settings:
        if bool(self.basic_auth_user) != bool(self.basic_auth_pass):
            raise ValueError("set both BASIC_AUTH_USER and BASIC_AUTH_PASS, or neither")
        if self.worker_heartbeat_interval * 2 > self.worker_abandoned_after:
            raise ValueError("WORKER_HEARTBEAT_INTERVAL must be at most half of WORKER_ABANDONED_AFTER, or busy "
                             "workers would look dead")
        return self

    @property
    def embedded(self) -> bool:
        """True when no Redis is configured: jobs run on a thread of the server process."""
        return self.redis_url is None

    @property
    def checkpoint(self) -> str:
        """The checkpoint to load; the default demo model is looked up in the working directory, then the repo root."""
        value = self.evf_sam_checkpoint
        if value == DEMO_CHECKPOINT and not Path(value).exists():
            return str(REPO_ROOT / value)
        return value

    def describe(self) -> dict[str, object]:
        """A loggable summary: secrets show only whether they are set; Redis passwords are masked."""
        return {
            "mode": "embedded" if self.embedded else "redis",
            "redis": redact_url(self.redis_url.get_secret_value()) if self.redis_url else None,
            "checkpoint": self.checkpoint,
            "device": self.evf_sam_device,
            "dtype": self.evf_sam_dtype,
            "preprocess": self.evf_sam_preprocess,
            "batch": {"jobs": self.worker_batch_jobs, "wait_ms": self.worker_batch_wait_ms},
            "label_studio_url": self.label_studio_url,
            "label_studio_api_key": "set" if self.label_studio_api_key else None,
            "basic_auth": "on" if self.basic_auth_user else "off",
            "webhook_secret": "set" if self.webhook_secret else None,
            "queues": [self.queue_interactive, self.queue_batch],
            "predict_timeout": self.predict_timeout,
        }


def redact_url(url: str) -> str:
    """`redis://:secret@host:6379/0` -> `redis://***@host:6379/0`."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment once."""
    return Settings()
