"""Schemas of every state file under the data root and in a ROI archive, checked once, where they are read.

A file under `data_root` may have been hand-edited, truncated by a full disk, or come from an archive
someone crafted. Before this module, code indexed into the parsed JSON directly: a manifest without
`threshold` raised KeyError in every place that showed the ROI's state, at start-up too. Now each file
is parsed by a pydantic model (types, finiteness, ranges, ids by the request id rules) at the boundary,
and the caller gets either the JSON object as written (so new and unknown keys survive) or a
`StateFileError` that says what is wrong. What to do with a bad file (rebuild from the samples, drop
the window, refuse the archive) is the caller's decision; none of them indexes into it blindly.

Older files stay valid: every key added after format 1 is optional (tests/test_compat.py's v1 root).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    FiniteFloat,
    StrictBool,
    StrictInt,
    ValidationError,
    model_validator,
)

from core.drift import STATES
from core.errors import AnomalyError
from core.ids import safe_text, validate_id

MAX_LIST = 1_000_000  # longer lists in a state file are not ours


class StateFileError(AnomalyError):
    """A state file exists but is not what the agent writes (code `invalid_state_file`)."""

    def __init__(self, message: str, code: str = "invalid_state_file") -> None:
        super().__init__(message, code)


def _id(value: str) -> str:
    try:
        return validate_id(value)
    except AnomalyError:
        raise ValueError(f"{safe_text(value, 80)!r} is not a valid id") from None


Id = Annotated[str, AfterValidator(_id)]
Count = Annotated[StrictInt, Field(ge=0)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Text = Annotated[str, Field(max_length=4000)]


class _Open(BaseModel):
    """Unknown keys are kept (a newer agent may add some); the known ones are checked."""

    model_config = ConfigDict(extra="allow")


class Identity(_Open):
    name: Annotated[str, Field(min_length=1, max_length=200)]
    resolution: StrictInt | None


class Threshold(_Open):
    value: Annotated[FiniteFloat, Field(ge=0)] | None
    method: Annotated[str, Field(min_length=1, max_length=100)]
    details: dict[str, Any]


class Counts(_Open):
    ok: Count
    ng: Count
    bank: Count
    patches: Count


class BranchInfo(_Open):
    identity: Identity
    bank: Count | None = None
    bank_rows_total: Count | None = None


class BranchScaleInfo(BaseModel):  # fusion.BranchScale(**x): no other key
    mean: FiniteFloat
    std: Annotated[FiniteFloat, Field(gt=0)]


class Suspect(_Open):
    sample_id: Id


class PolicyOverride(BaseModel):
    model_config = ConfigDict(extra="forbid")
    policy: Literal["auto", "ok_only"]
    ok_percentile: Annotated[FiniteFloat, Field(gt=0, le=100)] | None = None
    ng_margin: Annotated[FiniteFloat, Field(ge=0, le=1)] | None = None
    ng_recall: Annotated[FiniteFloat, Field(gt=0, le=1)] | None = None


class Fusion(_Open):  # core/roi/tuning.py: the branches a ROI fuses, and why
    active: Annotated[list[Annotated[int, Field(ge=0, lt=16)]], Field(min_length=1, max_length=16)]
    by: Literal["default", "proxy", "proxy+labels", "all"]
    branches: Annotated[int, Field(ge=1, le=16)]


class NgRank(_Open):  # core/roi/ng_ranking.py: whether NG samples rank the ROI's parts, and why
    form: Literal["ng_bank", "linear_head"] | None
    active: Annotated[list[Annotated[int, Field(ge=0, lt=16)]], Field(min_length=1, max_length=16)]
    ng_samples: Count
    reason: Text | None = None
    cv_auroc_gain: dict[Literal["ng_bank", "linear_head"], FiniteFloat] = {}
    scales: Annotated[list[BranchScaleInfo], Field(max_length=16)] = []
    spread: Annotated[FiniteFloat, Field(gt=0)] | None = None
    decided_at: Count | None = None  # the NG sample count the form was decided at (a growth step)

    @model_validator(mode="after")
    def _complete(self) -> NgRank:
        if self.form is not None and (self.spread is None or len(self.scales) != len(self.active)):
            raise ValueError("an NG-aware form needs a scale per active branch and a spread")
        return self


Score = FiniteFloat
ScoreList = Annotated[list[Score], Field(max_length=MAX_LIST)]


class Manifest(_Open):
    role_id: Id
    roi_id: Id
    version: Count
    backbone: Identity
    settings: dict[str, Any] | None = None
    threshold: Threshold
    counts: Counts
    ok_scores: ScoreList = []
    ng_scores: ScoreList = []
    sample_scores: dict[Literal["ok", "ng"], dict[Id, Score]] = {}
    suspect_samples: Annotated[list[Suspect], Field(max_length=MAX_LIST)] = []
    branches: list[BranchInfo] | None = None
    branch_scales: list[BranchScaleInfo] = []
    fusion: Fusion | None = None
    ng_rank: NgRank | None = None
    bank_rows_total: Count | None = None
    change: Text | None = None
    rollback_of: Count | None = None
    policy_override: PolicyOverride | None = None
    mask_error: Text | None = None
    updated_utc: Text


class PendingDelete(BaseModel):
    op: Literal["delete"]
    ids: dict[Literal["ok", "ng"], Annotated[list[Id], Field(max_length=MAX_LIST)]]
    reason: Text = "deleted"
    change: Annotated[str, Field(pattern=r"^[a-z_]{1,40}$")] = "delete"
    mask: StrictBool = False


class PendingRollback(BaseModel):
    op: Literal["rollback"]
    to: Count
    new_version: Annotated[StrictInt, Field(ge=1)]


class SampleMeta(_Open):
    sample_id: Id
    image_file: Id
    sha256: Sha256
    mm_per_px: Annotated[FiniteFloat, Field(gt=0)] | None = None
    timestamp_utc: Text | None = None


class DriftState(_Open):
    state: Literal[STATES]  # type: ignore[valid-type]
    predictions: Count
    enough_data: StrictBool
    reasons: list[Text] = []
    ng_rate: Annotated[FiniteFloat, Field(ge=0, le=1)] | None = None
    ng_rate_usual: Annotated[FiniteFloat, Field(ge=0, le=1)] | None = None
    recent_ok_median: FiniteFloat | None = None
    reference_ok_median: FiniteFloat | None = None
    threshold: FiniteFloat | None = None
    margin_used: FiniteFloat | None = None


class DriftFile(_Open):
    state: Literal[STATES] = "ok"  # type: ignore[valid-type]
    recent: Annotated[list[tuple[FiniteFloat, StrictBool]], Field(max_length=MAX_LIST)] = []
    older: Annotated[list[StrictBool], Field(max_length=MAX_LIST)] = []
    last: DriftState | None = None


Pair = tuple[Annotated[StrictInt, Field(ge=1)], Annotated[StrictInt, Field(ge=1)]]


class IndexEntry(_Open):
    sample_id: Id
    offset: Count
    count: Count
    grid: Pair
    input_size: Pair


class IndexMeta(_Open):
    identity: dict[str, Any] | None = None
    dim: Count
    rows: Count
    entries: Annotated[list[IndexEntry], Field(max_length=MAX_LIST)]


class VersionSamples(BaseModel):
    ok: list[Id] = []
    ng: list[Id] = []


# pydantic's regexes are Rust's: "$" is the very end (no final newline before it), "\A"/"\Z" do not exist
MEMBER = r"^(manifest\.json|mask\.png|(b\d{1,2}-)?bank\.npz|samples/(ok|ng)/[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63})$"


class ExportMeta(_Open):
    format: Literal[1]
    role_id: Id
    roi_id: Id
    model_version: Count
    backbone: Identity
    branches: list[Identity]
    settings: dict[str, Any] | None = None
    files: dict[Annotated[str, Field(pattern=MEMBER)], Sha256]


def _reason(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        where = ".".join(str(x) for x in err["loc"]) or "(top)"
        parts.append(f"{where}: {err['msg']}")
    more = exc.error_count() - len(parts)
    return safe_text("; ".join(parts) + (f" (and {more} more)" if more > 0 else ""), 600)


def check(schema: type[BaseModel], obj: object, what: str) -> dict:
    """`obj` itself when it passes `schema`, else StateFileError naming the file and the first problems."""
    try:
        schema.model_validate(obj)
    except ValidationError as exc:
        raise StateFileError(f"{what} is not valid: {_reason(exc)}") from None
    if not isinstance(obj, dict):  # every schema here is an object: pydantic refused anything else already
        raise StateFileError(f"{what} is not a JSON object")
    return obj


def check_manifest(obj: object, what: str = "manifest.json") -> dict:
    return check(Manifest, obj, what)


def check_pending(obj: object) -> dict:
    schema: type[BaseModel] = PendingRollback if isinstance(obj, dict) and obj.get("op") == "rollback" \
        else PendingDelete
    return check(schema, obj, "pending.json")


def check_sample(obj: object, what: str = "sample JSON") -> dict:
    return check(SampleMeta, obj, what)


def check_drift(obj: object) -> dict:
    return check(DriftFile, obj, "drift.json")


def check_export(obj: object) -> dict:
    return check(ExportMeta, obj, "export.json")


def check_index(obj: object, what: str = "index JSON") -> dict:
    return check(IndexMeta, obj, what)


def check_version_samples(obj: object) -> dict:
    return check(VersionSamples, obj, "samples.json")
