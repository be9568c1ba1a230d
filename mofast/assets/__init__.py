"""The embedded default: real UltraFeedback preference pairs and the real stories260K model.

Both are shipped inside the package (provenance files beside them), so the default run
needs no network and nothing outside the repository.
"""

from pathlib import Path

ASSETS = Path(__file__).resolve().parent
STORIES260K = ASSETS / "stories260K"
ULTRAFEEDBACK = ASSETS / "ultrafeedback"

# The two objectives of the default run: two real preference datasets, one per criterion.
DEFAULT_OBJECTIVES = {
    "overall_score": ULTRAFEEDBACK / "overall_score_train.jsonl.gz",
    "rubric_mean": ULTRAFEEDBACK / "rubric_mean_1k.jsonl.gz",
}
DEFAULT_EVAL = ULTRAFEEDBACK / "overall_score_eval.jsonl.gz"


def shipped_models() -> dict[str, Path]:
    """The models shipped here, by folder name (`stories260K`): what `--model NAME` finds."""
    return {p.name: p for p in sorted(ASSETS.iterdir()) if (p / "config.json").is_file()}


def find_local_model(name: str) -> Path | None:
    """`name` as a local path (`~` expanded) where it exists, else the shipped model of that
    name, else None (a hub id, or nothing at all)."""
    path = Path(name).expanduser()
    return path if path.exists() else shipped_models().get(name)


def shadow_hint(name: str) -> str:
    """A hint for a local folder that holds no model but has a shipped model's name."""
    shipped = shipped_models().get(name)
    if shipped is None:
        return ""
    return f" (the local folder shadows the shipped model {name}; give its path: {shipped})"
