"""`kernel-metadata.json`: accelerator names, slugs, and the rules the Kaggle client and server enforce.

Everything here is checked locally, before any network call, so a bad title or dataset reference costs
nothing and gets one clear line instead of a server-side rejection (which the client does not even raise).
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from kaggletrain.errors import KaggleError

METADATA_FILE = "kernel-metadata.json"
MAX_CODE_BYTES = 1_000_000  # a pushed kernel uploads only its code file, and Kaggle caps it at 1 MB
TITLE_MIN, TITLE_MAX = 5, 50


@dataclass(frozen=True)
class Accelerator:
    shape: str | None  # the `machine_shape` value; None means a CPU session
    label: str  # what the Kaggle editor calls it
    gpus: int
    note: str = ""


# Names the current client documents for `machine_shape` / `--accelerator` (kaggle-cli docs/kernels.md and
# PR #1198): NvidiaTeslaT4 *is* "GPU T4 x2" (a single T4 is not offered). TPUs are left out on purpose: the
# trainer is PyTorch on CUDA, and pushed TPU kernels currently get the non-TPU image anyway (kaggle-cli #1197).
ACCELERATORS: dict[str, Accelerator] = {
    "NvidiaTeslaT4": Accelerator("NvidiaTeslaT4", "GPU T4 x2", 2, "the default GPU; precision auto gives fp16"),
    "NvidiaL4": Accelerator("NvidiaL4", "GPU L4", 1),
    "NvidiaL4X1": Accelerator("NvidiaL4X1", "GPU L4 x1", 1),
    "NvidiaTeslaA100": Accelerator("NvidiaTeslaA100", "GPU A100", 1, "competition-only on most accounts"),
    "NvidiaH100": Accelerator("NvidiaH100", "GPU H100", 1, "competition-only on most accounts"),
    "NvidiaRtxPro6000": Accelerator("NvidiaRtxPro6000", "GPU RTX PRO 6000", 1, "competition-only on most accounts"),
    "None": Accelerator(None, "CPU (no accelerator)", 0),
}
DEFAULT_ACCELERATOR = "NvidiaTeslaT4"

# Names the client would accept but that cannot work for us: say why instead of "unknown".
_REJECTED = {
    "nvidiateslap100": "NvidiaTeslaP100 is retired (the current image's PyTorch has no kernels for the P100); "
    "use NvidiaTeslaT4",
    "nvidiateslat4highmem": "NvidiaTeslaT4Highmem is an admin-only pool; NvidiaTeslaT4 already means T4 x2",
    "tpuv38": "TPUs are not supported: kaggletrain trains with PyTorch on CUDA",
    "tpu1vmv38": "TPUs are not supported: kaggletrain trains with PyTorch on CUDA",
    "tpuv5e8": "TPUs are not supported: kaggletrain trains with PyTorch on CUDA",
    "tpuv6e8": "TPUs are not supported: kaggletrain trains with PyTorch on CUDA",
}
_CPU_ALIASES = {"none", "cpu", ""}


def resolve_accelerator(name: str | None) -> Accelerator:
    """Case-insensitive lookup of an accelerator name; unknown or retired names raise KaggleError."""
    key = (name if name is not None else DEFAULT_ACCELERATOR).strip()
    if key.lower() in _CPU_ALIASES:
        return ACCELERATORS["None"]
    for canonical, acc in ACCELERATORS.items():
        if canonical.lower() == key.lower():
            return acc
    if key.lower() in _REJECTED:
        raise KaggleError(f"accelerator {key!r}: {_REJECTED[key.lower()]}")
    raise KaggleError(f"unknown accelerator {key!r}; choose one of: {', '.join(ACCELERATORS)}")


def slugify(text: str) -> str:
    """Kaggle's slug of a title: ASCII-folded, lowercase, runs of other characters become one dash.

    Matches python-slugify's defaults, which the client uses to compare `id` with `title` (a test checks this).
    """
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii").lower()
    return re.sub(r"[^a-z0-9]+", "-", folded).strip("-")


_OWNER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_SLUG_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")


def check_ref(ref: str, what: str) -> tuple[str, str]:
    """Split an `owner/slug` reference, with a clear error for anything else."""
    parts = ref.split("/") if isinstance(ref, str) else []
    if len(parts) != 2 or not _OWNER_RE.match(parts[0]) or not _SLUG_RE.match(parts[1]):
        raise KaggleError(f"{what} {ref!r} is not of the form owner/slug (e.g. alice/tiny-shakespeare)")
    return parts[0], parts[1]


def parse_kernel_ref(ref: str) -> tuple[str, str, str | None]:
    """`owner/slug`, `owner/slug/VERSION` or a kaggle.com/code URL -> (owner, slug, version or None)."""
    text = ref.strip()
    url = re.match(r"^(?:https?://)?(?:www\.)?kaggle\.com/code/(.+?)/?$", text)
    if url:
        text = url.group(1)
    parts = text.split("/")
    version = None
    if len(parts) == 3 and parts[2].lstrip("v").isdigit():
        version = parts[2].lstrip("v")
        parts = parts[:2]
    owner, slug = check_ref("/".join(parts), "kernel")
    return owner, slug, version


@dataclass
class KernelSpec:
    """What a push needs to know besides the notebook itself."""

    owner: str
    title: str
    code_file: str
    accelerator: Accelerator = field(default_factory=lambda: ACCELERATORS[DEFAULT_ACCELERATOR])
    datasets: list[str] = field(default_factory=list)
    private: bool = True
    internet: bool = True

    @property
    def slug(self) -> str:
        return slugify(self.title)

    @property
    def ref(self) -> str:
        return f"{self.owner}/{self.slug}"

    def to_metadata(self) -> dict:
        # Every field written out, booleans as JSON booleans, machine_shape always present: the server's
        # defaults for missing fields are what surprised users (P100 for a bare enable_gpu).
        return {
            "id": self.ref,
            "title": self.title,
            "code_file": self.code_file,
            "language": "python",
            "kernel_type": "notebook",
            "is_private": self.private,
            "enable_gpu": self.accelerator.shape is not None,
            "enable_tpu": False,
            "enable_internet": self.internet,
            "machine_shape": self.accelerator.shape,
            "dataset_sources": list(self.datasets),
            "competition_sources": [],
            "kernel_sources": [],
            "model_sources": [],
        }


def metadata_problems(meta: dict) -> list[str]:
    """Every rule a kernel-metadata dict breaks (empty list: fine). Does not look at files."""
    problems: list[str] = []
    title = meta.get("title")
    if not isinstance(title, str) or not (TITLE_MIN <= len(title.strip()) <= TITLE_MAX):
        shown = f"{len(title.strip())} characters" if isinstance(title, str) else "missing"
        problems.append(f"title must be {TITLE_MIN} to {TITLE_MAX} characters ({shown}: {title!r})")
    elif len(slugify(title)) < TITLE_MIN:
        problems.append(f"title {title!r} gives the slug {slugify(title)!r}; it needs at least {TITLE_MIN} "
                        "letters or digits")
    kid = meta.get("id")
    try:
        _, slug = check_ref(kid, "id")
        if isinstance(title, str) and slug != slugify(title):
            problems.append(f"id slug {slug!r} must equal the slugified title {slugify(title)!r}")
    except KaggleError as e:
        problems.append(str(e))
    if meta.get("language") != "python":
        problems.append(f"language must be 'python' (got {meta.get('language')!r})")
    if meta.get("kernel_type") != "notebook":
        problems.append(f"kernel_type must be 'notebook' (got {meta.get('kernel_type')!r})")
    if not isinstance(meta.get("code_file"), str) or not meta["code_file"].endswith(".ipynb"):
        problems.append(f"code_file must name the .ipynb notebook (got {meta.get('code_file')!r})")
    for key in ("is_private", "enable_gpu", "enable_internet"):
        if not isinstance(meta.get(key), bool):
            problems.append(f"{key} must be a JSON boolean true/false (got {meta.get(key)!r})")
    if "enable_tpu" in meta and meta["enable_tpu"] is not False:
        problems.append("enable_tpu must be false (TPUs are not supported)")
    if "machine_shape" not in meta:
        problems.append("machine_shape must be set explicitly (e.g. NvidiaTeslaT4 for T4 x2; null for CPU)")
    else:
        shape = meta["machine_shape"]
        try:
            acc = ACCELERATORS["None"] if shape in (None, "") else resolve_accelerator(shape)
            if acc.shape != shape and shape not in (None, ""):
                problems.append(f"machine_shape {shape!r} must be spelled {acc.shape!r}")
            if meta.get("enable_gpu") is True and acc.shape is None:
                problems.append("enable_gpu is true but machine_shape names no GPU")
            if meta.get("enable_gpu") is False and acc.shape is not None:
                problems.append(f"machine_shape {shape!r} needs enable_gpu true")
        except KaggleError as e:
            problems.append(str(e))
    sources = meta.get("dataset_sources", [])
    if not isinstance(sources, list):
        problems.append("dataset_sources must be a list of owner/slug strings")
    else:
        for src in sources:
            try:
                check_ref(src, "dataset")
            except KaggleError as e:
                problems.append(str(e))
    for key in ("competition_sources", "kernel_sources", "model_sources"):
        if not isinstance(meta.get(key, []), list):
            problems.append(f"{key} must be a list")
    return problems


def notebook_problems(nb_path: Path) -> list[str]:
    """Rules for the code file: exists, under 1 MB, valid JSON notebook with metadata.kernelspec."""
    if not nb_path.is_file():
        return [f"code file {nb_path} does not exist"]
    size = nb_path.stat().st_size
    problems = []
    if size >= MAX_CODE_BYTES:
        problems.append(f"{nb_path.name} is {size / 1e6:.2f} MB; Kaggle accepts code files under 1 MB")
    try:
        nb = json.loads(nb_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return problems + [f"{nb_path.name} is not a JSON notebook ({e})"]
    if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list):
        problems.append(f"{nb_path.name} has no cells list")
    elif not isinstance(nb.get("metadata", {}).get("kernelspec"), dict):
        problems.append(f"{nb_path.name} lacks metadata.kernelspec (papermill on Kaggle fails without it)")
    return problems


def validate_folder(folder: Path) -> dict:
    """Load and check a kernel folder; raise one KaggleError naming every problem. Returns the metadata."""
    meta_path = Path(folder) / METADATA_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KaggleError(f"{meta_path} not found: is {folder} a kernel folder?") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise KaggleError(f"{meta_path} is not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise KaggleError(f"{meta_path} must hold a JSON object")
    problems = metadata_problems(meta)
    if isinstance(meta.get("code_file"), str):
        problems += notebook_problems(meta_path.parent / meta["code_file"])
    if problems:
        raise KaggleError(f"{meta_path}: " + "; ".join(problems))
    return meta
