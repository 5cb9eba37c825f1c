"""The pipeline spec: one pydantic model shared by the spec file (`qadistill distill`) and `POST /v1/jobs`.

Loss conventions (toolkits disagree on both, so they are fixed here):
- `alpha` weighs the *soft* term: L = (1 - alpha) * CE(student, hard) + alpha * T^2 * KL(p_T || q_T),
  with p_T = softmax(teacher / T) and q_T = softmax(student / T).
- The soft term is multiplied by T^2 so that its gradients keep the same scale as T changes
  (Hinton et al. 2015).
"""

from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

Variant = Literal["kd", "mkd", "tkd", "tmkd"]
VARIANTS_WITH_STAGE1: frozenset[str] = frozenset({"tkd", "tmkd"})
SINGLE_TEACHER_VARIANTS: frozenset[str] = frozenset({"kd", "tkd"})

# Measured on WikiQA/TrecQA (benchmarks/results/quality.md): 5 and 10 alike; 1 keeps less out of domain, 0 least.
DEFAULT_EMBEDDING_WEIGHT = 5.0
# A bi-encoder teacher's: at 1 MiniLM keeps its in-domain MAP and stays above its zero-shot TrecQA floor.
DEFAULT_TEACHER_EMBEDDING_WEIGHT = 1.0

Name = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TeacherSpec(_Strict):
    """One teacher: fine-tuned from `base` with its own hyper-parameters, used zero-shot, or ready-made at `path`."""

    name: Name = Field(description="Id of the teacher within the job; names its head in the student.")
    kind: Literal["bi-encoder", "cross-encoder"] = Field(
        "bi-encoder",
        description="bi-encoder: question and passage embedded apart (mean pooling, as sentence-embedding "
        "checkpoints were trained), scored by cosine, fine-tuned with a ranking loss over each question's "
        "candidates and in-batch negatives; keeps what the checkpoint knows. cross-encoder: the pair read "
        "together by a fresh 2-class classifier on the [CLS] token, fine-tuned with cross-entropy.",
    )
    base: str = Field(
        "all-MiniLM-L6-v2",
        description="Base checkpoint: 'all-MiniLM-L6-v2', 'all-mpnet-base-v2' or a Hugging Face model folder.",
    )
    path: str | None = Field(None, description="A ready-made teacher folder; when set, no training.")
    learning_rate: float = Field(2e-5, gt=0, le=1)
    epochs: float = Field(
        1.0, ge=0, le=50, description="0: the base checkpoint used zero-shot, no training (bi-encoder only)."
    )
    batch_size: int = Field(
        128, ge=1, le=1024, description="Pairs per batch; a bi-encoder's batches hold whole questions."
    )
    max_length: int = Field(128, ge=8, le=512)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    max_steps: int | None = Field(None, ge=1, le=2**31 - 1, description="Stop after this many optimiser steps.")
    keep_base: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="After fine-tuning, each weight becomes keep_base * base + (1 - keep_base) * fine-tuned "
        "(weight-space ensembling, WiSE-FT): keeps more of what the base checkpoint knew out of domain, for "
        "some of what it learnt in domain (MiniLM teachers on WikiQA at 0.3: 0.8 to 1.0 MAP points lost in "
        "domain, 1.9 to 3.9 gained on TrecQA). Encoder weights only: a cross-encoder's classifier stays.",
    )
    average_of: list[Name] | None = Field(
        None,
        min_length=2,
        max_length=8,
        description="A model soup: this teacher's weights are the mean of these earlier bi-encoder teachers' "
        "(fine-tuned from this teacher's base), with keep_base of the base's mixed in; no training of its own. "
        "Averaging teachers fine-tuned with different settings, and a share of their base, keeps more of both "
        "than either (MiniLM on WikiQA / TrecQA: see benchmarks/results/quality.md).",
    )
    embedding_weight: float | None = Field(
        None,
        ge=0,
        le=1000,
        description="Bi-encoder teachers: adds this weight times the squared distance between the teacher's unit "
        "embeddings of every training question and passage and its base checkpoint's, so that fine-tuning "
        "moves the embeddings only as far as the ranking needs (MiniLM on WikiQA at 1: the same MAP in domain, "
        "2.7 points more on TrecQA, and room for a higher learning rate: see benchmarks/results/quality.md); "
        f"null: {DEFAULT_TEACHER_EMBEDDING_WEIGHT:g} for a bi-encoder teacher that trains, 0 for the others.",
    )

    @model_validator(mode="after")
    def resolve_embedding_weight(self) -> Self:
        """Fill in embedding_weight's default for this teacher's kind; a value given stays as it is."""
        if self.embedding_weight is None:
            trains = self.kind == "bi-encoder" and self.path is None and self.average_of is None and self.epochs > 0
            self.embedding_weight = DEFAULT_TEACHER_EMBEDDING_WEIGHT if trains else 0.0
        return self

    @property
    def zero_shot(self) -> bool:
        """A bi-encoder used as its base checkpoint is: epochs 0, neither a ready-made folder nor a soup."""
        return self.kind == "bi-encoder" and self.epochs == 0 and self.path is None and self.average_of is None


class StudentSpec(_Strict):
    """The compact student: a bi-encoder or a cross-encoder transformer (initialised from chosen layers of
    init_from), or the paper's BiLSTM. See app.distill.students."""

    kind: Literal["bi-encoder", "transformer", "bilstm"] = Field(
        "bi-encoder",
        description="bi-encoder: question and passage encoded apart by chosen layers of a BERT "
        "sentence-embedding model and scored by cosine (starts from that model's zero-shot ranking); "
        "transformer: a cross-encoder on the [CLS] token; bilstm: the TMKD paper's BiLSTM.",
    )
    init_from: str | None = Field(
        "all-MiniLM-L6-v2",
        description="Model to copy embeddings and layers from (a base name, a folder or a teacher's name); "
        "null trains from scratch with the sizes below and the tokenizer of the first teacher.",
    )
    layers: list[Annotated[int, Field(ge=0, le=2**31 - 1)]] | None = Field(
        None, description="Which encoder layers of init_from to keep, e.g. [0, 2, 4]; null keeps num_layers."
    )
    num_layers: int = Field(3, ge=1, le=24)
    hidden_size: int = Field(384, ge=8, le=4096)
    num_attention_heads: int = Field(12, ge=1, le=64)
    intermediate_size: int = Field(1536, ge=8, le=16384)
    embedding_dim: int = Field(128, ge=8, le=1024, description="BiLSTM only.")
    lstm_hidden: int = Field(256, ge=8, le=2048, description="BiLSTM only.")
    max_length: int = Field(128, ge=8, le=512)


class DistillSpec(_Strict):
    """Knowledge-distillation weights: see the module docstring for the conventions."""

    temperature: float = Field(2.0, gt=0, le=100, description="T; soft term scaled by T^2.")
    alpha: float = Field(
        0.3,
        ge=0,
        le=1,
        description="Weight of the soft (teacher) term; 1-alpha on hard labels. 0.3: teachers fine-tuned on the "
        "same labelled pairs give soft labels close to the labels there (WikiQA: 0.3 beat 0.5 and 0.7 in domain, "
        "the same out of domain).",
    )
    loss: Literal["listwise", "pointwise"] = Field(
        "listwise",
        description="listwise: softmax over each question's candidates (KL to the teacher's, cross-entropy "
        "on the relevant ones), then each head calibrated on the training pairs; pointwise: per-pair "
        "2-class softmax, the paper's form.",
    )
    combine: Literal["mean"] = Field("mean", description="How heads' and members' scores combine.")
    embedding_from: str | None = Field(
        None,
        description="The bi-encoder whose embeddings a stage's embedding_weight term matches: a teacher's "
        "name or a base checkpoint of the student's width; null: student.init_from.",
    )


class StageSpec(_Strict):
    """Training settings of one student stage."""

    epochs: float = Field(1.0, gt=0, le=50)
    learning_rate: float = Field(5e-5, gt=0, le=1)
    batch_size: int = Field(32, ge=1, le=4096)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.01, ge=0, le=1)
    max_steps: int | None = Field(None, ge=1, le=2**31 - 1, description="Stop after this many optimiser steps.")
    head_learning_rate: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Learning rate of the per-teacher heads (not decayed), apart from the encoder's; "
        "null: learning_rate, decayed like the rest.",
    )
    keep_start: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="After the stage, each weight becomes keep_start * its value at the stage's start + "
        "(1 - keep_start) * its value at the end (WiSE-FT): keeps more of what the student knew before.",
    )
    embedding_weight: float | None = Field(
        None,
        ge=0,
        le=1000,
        description="Bi-encoder students: weight of a term that pulls the student's question and passage "
        "embeddings towards those of distill.embedding_from (squared distance of the unit vectors) on every "
        "pair of the stage, so that the student keeps what the layers it left out computed, on any text; "
        f"null: {DEFAULT_EMBEDDING_WEIGHT:g} for a bi-encoder student, 0 for the others.",
    )


class DataSpec(_Strict):
    """Data sets: file paths for `qadistill distill`, dataset ids or names for the service."""

    train: str = Field(min_length=1, description="Labelled pairs: teachers' training and stage 2.")
    eval: list[Annotated[str, StringConstraints(min_length=1)]] = Field(
        min_length=1,
        max_length=8,
        description="Labelled pairs the teachers and students are measured on: one set, or a list of sets "
        "each reported in its own table (the first also chooses the serving form at registration).",
    )
    unlabeled: str | None = Field(None, description="Unlabelled pairs for stage 1 (needed by tkd and tmkd).")

    @field_validator("eval", mode="before")
    @classmethod
    def one_or_many(cls, value: object) -> object:
        """A single evaluation set may be given as a plain string."""
        return [value] if isinstance(value, str) else value


class PipelineSpec(_Strict):
    """A whole distillation run: teachers, student, distillation weights, stages and variants."""

    name: Name = Field(description="Model name the resulting student ensemble is registered under.")
    variants: list[Variant] = Field(["tmkd"], min_length=1, description="Variants trained side by side.")
    data: DataSpec
    teachers: list[TeacherSpec] = Field(min_length=1, max_length=8)
    student: StudentSpec = StudentSpec()
    distill: DistillSpec = DistillSpec()
    stage1: StageSpec = StageSpec()
    stage2: StageSpec = StageSpec()
    ensemble_size: int = Field(1, ge=1, le=8, description="M-on-M: students per variant, scores averaged.")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    checkpoint_every: int = Field(
        100, ge=1, le=2**31 - 1, description="Checkpoint every N optimiser steps (and at stage end)."
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="after")
    def check_consistency(self) -> Self:
        """Cross-field rules; each error names the field at fault."""
        if len(set(self.variants)) != len(self.variants):
            raise ValueError("variants: each variant may appear once")
        names = [t.name for t in self.teachers]
        if len(set(names)) != len(names):
            raise ValueError("teachers: teacher names must be unique")
        if any(v in VARIANTS_WITH_STAGE1 for v in self.variants) and not self.data.unlabeled:
            raise ValueError("data.unlabeled: variants tkd and tmkd need unlabelled pairs for stage 1")
        if self.student.kind != "bilstm" and self.student.layers is not None:
            if not self.student.layers:
                raise ValueError("student.layers: give at least one layer, or null")
            if len(set(self.student.layers)) != len(self.student.layers):
                raise ValueError("student.layers: layers must be distinct")
        for i, teacher in enumerate(self.teachers):
            if teacher.kind == "cross-encoder" and teacher.epochs == 0 and teacher.path is None:
                raise ValueError(
                    f"teachers.{i}.epochs: a cross-encoder teacher starts from a fresh classifier and needs "
                    "training (epochs > 0); use kind 'bi-encoder' for a zero-shot teacher"
                )
            if teacher.average_of is not None:
                self._check_soup(i, teacher)
            if teacher.embedding_weight and teacher.kind != "bi-encoder":
                raise ValueError(f"teachers.{i}.embedding_weight: only a bi-encoder teacher has embeddings to keep")
        if self.student.kind == "bi-encoder" and self.student.init_from is None:
            raise ValueError("student.init_from: a bi-encoder student starts from a sentence-embedding model")
        for stage in ("stage1", "stage2"):
            if getattr(self, stage).embedding_weight and self.student.kind != "bi-encoder":
                raise ValueError(f"{stage}.embedding_weight: only a bi-encoder student has embeddings to match")
        if self.student.init_from is None and self.student.hidden_size % self.student.num_attention_heads:
            raise ValueError("student.hidden_size: must be a multiple of student.num_attention_heads")
        return self

    def _check_soup(self, i: int, teacher: TeacherSpec) -> None:
        """A soup averages distinct earlier bi-encoder teachers fine-tuned from its own base."""
        field = f"teachers.{i}.average_of"
        if teacher.kind != "bi-encoder" or teacher.path is not None:
            raise ValueError(f"{field}: a soup is a bi-encoder teacher built here (kind bi-encoder, no path)")
        if teacher.embedding_weight:
            raise ValueError(f"{field}: a soup is not trained, so it has no embedding_weight")
        if len(set(teacher.average_of or [])) != len(teacher.average_of or []):
            raise ValueError(f"{field}: each teacher may appear once")
        earlier = {t.name: t for t in self.teachers[:i]}
        for name in teacher.average_of or []:
            member = earlier.get(name)
            if member is None:
                raise ValueError(f"{field}: {name!r} is not a teacher listed before this one")
            # A ready-made member (path) is checked when the weights are averaged: same shapes.
            if member.kind != "bi-encoder" or (member.path is None and member.base != teacher.base):
                raise ValueError(
                    f"{field}: {name!r} must be a bi-encoder teacher from this teacher's base {teacher.base!r}"
                )

    @property
    def primary_variant(self) -> str:
        """The variant registered and served: tmkd when it is run, else the last one listed."""
        return "tmkd" if "tmkd" in self.variants else self.variants[-1]

    def embedding_weight(self, stage: Literal["stage1", "stage2"]) -> float:
        """The stage's embedding_weight, its default resolved for the student's kind."""
        weight = getattr(self, stage).embedding_weight
        if weight is None:
            return DEFAULT_EMBEDDING_WEIGHT if self.student.kind == "bi-encoder" else 0.0
        return weight

    def teachers_for(self, variant: str) -> list[TeacherSpec]:
        """The teachers a variant learns from: the first for kd/tkd, all for mkd/tmkd."""
        return self.teachers[:1] if variant in SINGLE_TEACHER_VARIANTS else list(self.teachers)
