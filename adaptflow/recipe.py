"""The recipe: every section of a build in one typed schema, loaded in layers (defaults → recipe YAML → overrides).

A recipe is pure data. `load_recipe` validates all of it at once and raises a `RecipeError` listing every
problem with its dotted path and offending value, so a user fixes a recipe in one pass, before any compute.
Each stage's section is that stage's `Config` (`adaptflow.stages.<name>`), so `stages:` holds exactly the stages
of the registry; a setting marked as a `Reference` must name a declared corpus or task.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, Field, ValidationError, create_model, model_validator

from adaptflow import stages as stage_registry
from adaptflow.config.base import DatasetName, Reference, Section
from adaptflow.config.sections import (
    CorpusConfig,
    DistributedConfig,
    ModelConfig,
    RegistryConfig,
    ScheduleConfig,
    TaskDataConfig,
    TokensConfig,
    TrackingConfig,
)
from adaptflow.errors import RecipeError
from adaptflow.stages import evaluate

DATA_ROOT_ENV = "ADAPTFLOW_DATA_ROOT"
DEFAULT_DATA_ROOT = "../shared/data"
_INDEX = re.compile(r"\[\d+\]$")


def _section_of(name: str) -> str:
    return getattr(stage_registry.get(name), "SECTION", f"stages.{name}")


def _stages_config() -> type[Section]:
    """`stages:` — one optional section per registered stage that lives under it, in the order stages run."""
    fields = {name: (stage_registry.get(name).Config | None, None) for name in stage_registry.names()
              if _section_of(name) == f"stages.{name}"}
    model = create_model("StagesConfig", __base__=Section, **fields)
    model.__doc__ = "The build's stages, in the order they run; each one is optional."
    return model


StagesConfig = _stages_config()


class Recipe(Section):
    domain: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")]
    description: str = ""
    seed: int = 0
    data_root: str | None = None
    workdir: str = "adaptflow-runs"
    checkpoint_mirror: str | None = None  # s3://bucket/prefix (or a path): resumable states copied there too
    tokens: TokensConfig = TokensConfig()
    model: ModelConfig
    corpora: dict[DatasetName, CorpusConfig] = Field(default_factory=dict)
    tasks: dict[DatasetName, TaskDataConfig] = Field(default_factory=dict)
    stages: StagesConfig = StagesConfig()
    evaluation: evaluate.Config = evaluate.Config()
    tracking: TrackingConfig = TrackingConfig()
    distributed: DistributedConfig = DistributedConfig()
    registry: RegistryConfig = RegistryConfig()
    schedule: ScheduleConfig | None = None  # deployed builds run on it (adaptflow deploy)

    @model_validator(mode="after")
    def _stages_agree(self) -> Recipe:
        """What a stage needs of the rest of the recipe (e.g. a decoder to generate with), checked by the stage."""
        for name in self.enabled_stages():
            if (check := getattr(stage_registry.get(name), "check_recipe", None)) is not None:
                check(self)
        return self

    @property
    def experiment_name(self) -> str:
        return self.tracking.experiment or f"adaptflow-{self.domain}"

    @property
    def registered_model_name(self) -> str:
        return self.registry.model_name or f"adaptflow-{self.domain}"

    def digest(self) -> str:
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def section(self, stage: str):
        """The config of `stage` (its section of the recipe), or None when the recipe has none."""
        node = self
        for part in _section_of(stage).split("."):
            node = getattr(node, part, None)
        return node

    def enabled(self, stage: str):
        """The config of `stage` when the recipe has it enabled, else None."""
        config = self.section(stage)
        return config if config is not None and config.enabled else None

    def enabled_stages(self) -> list[str]:
        return [name for name in stage_registry.names() if self.enabled(name) is not None]

    def used_corpora(self) -> list[str]:
        """Names of the corpora that the enabled stages, the evaluation or the tokenizer read, in recipe order."""
        used = {value for _, marker, value in references(Recipe, self.model_dump(), "") if marker.section == "corpora"}
        return [name for name in self.corpora if name in used]

    def used_tasks(self) -> list[str]:
        used = {value for _, marker, value in references(Recipe, self.model_dump(), "") if marker.section == "tasks"}
        return [name for name in self.tasks if name in used]

    def capped(self, *, max_steps: int | None = None, max_examples: int | None = None) -> Recipe:
        """A copy whose every stage runs at most `max_steps` and every corpus reads at most `max_examples`."""
        data = self.model_dump()
        if max_steps is not None:
            for stage in data["stages"].values():
                if stage and "max_steps" in stage:
                    stage["max_steps"] = min(stage["max_steps"] or max_steps, max_steps)
                    for warming in (stage, stage.get("target_mlm")):  # pretraining's head, adaptation's MLM head
                        if warming and "head_warmup_steps" in warming:
                            warming["head_warmup_steps"] = min(warming["head_warmup_steps"], stage["max_steps"] // 2)
        if max_examples is not None:
            for corpus in data["corpora"].values():
                corpus["max_documents"] = min(corpus["max_documents"] or max_examples, max_examples)
            for task in data["tasks"].values():
                task["max_examples"] = min(task["max_examples"] or max_examples, max_examples)
        return Recipe.model_validate(data)


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override, resolve and validate a recipe; raise `RecipeError` listing every problem at once."""
    path = Path(path)
    source = path.name
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecipeError(str(path), [f"file not found: {path} (recipes live in domains/, e.g. "
                                      "domains/tiny.yaml)"]) from None
    except yaml.YAMLError as err:
        raise RecipeError(source, [f"not valid YAML: {err}"]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(source, [f"the top level must be a mapping of keys, got {type(raw).__name__}"])

    problems: list[str] = []
    overridden: set[str] = set()
    for item in overrides:
        problem = apply_override(raw, item)
        if problem:
            problems.append(problem)
        else:
            overridden.add(item.split("=", 1)[0].strip())

    _resolve_paths(raw, recipe_dir=path.resolve().parent)
    problems += _reference_problems(raw)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as err:
        problems += [_describe(e, overridden) for e in err.errors()]
        recipe = None
    if problems:
        raise RecipeError(source, _dedupe(problems))
    return recipe


def apply_override(raw: dict, item: str) -> str | None:
    """Apply one `a.b.c=value` override in place (value parsed as YAML); return a problem or None."""
    if "=" not in item:
        return f"--set {item!r}: expected KEY=VALUE, e.g. --set stages.pretrain.lr=5e-5"
    key, text = (part.strip() for part in item.split("=", 1))
    parts = key.split(".")
    if not all(parts):
        return f"--set {item!r}: empty key segment in {key!r}"
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            return f"--set {item!r}: {where} is a {type(child).__name__}, not a section"
        node = child
    node[parts[-1]] = yaml.safe_load(text) if text else None
    return None


def resolve_data_root(raw_root: str | None, recipe_dir: Path) -> Path:
    """Where relative corpus paths point.

    The recipe's `data_root` (relative to the recipe file), else $ADAPTFLOW_DATA_ROOT, else `../shared/data`
    seen from the working directory or, failing that, from the project whose `domains/` holds the recipe.
    """
    if raw_root:
        return (recipe_dir / os.path.expanduser(raw_root)).resolve()
    if os.environ.get(DATA_ROOT_ENV):
        return Path(os.environ[DATA_ROOT_ENV]).expanduser().resolve()
    candidates = [Path.cwd() / DEFAULT_DATA_ROOT, recipe_dir.parent / DEFAULT_DATA_ROOT]
    return next((c.resolve() for c in candidates if c.is_dir()), candidates[0].resolve())


def _resolve_paths(raw: dict, recipe_dir: Path) -> None:
    """Turn relative data paths into absolute ones so that stages never depend on the working directory."""
    root = resolve_data_root(raw.get("data_root"), recipe_dir)

    def resolve(p):
        if isinstance(p, list):
            return [resolve(item) for item in p]
        if not isinstance(p, str):
            return p
        p = os.path.expanduser(p)
        return p if p.startswith("s3://") or os.path.isabs(p) else str(root / p)

    for section, keys in (("corpora", ("path",)), ("tasks", ("train", "validation", "test"))):
        entries = raw.get(section)
        if not isinstance(entries, dict):
            continue
        for entry in entries.values():
            if isinstance(entry, dict):
                for key in keys:
                    if key in entry:
                        entry[key] = resolve(entry[key])
    model = raw.get("model")
    if isinstance(model, dict) and isinstance(model.get("path"), str):
        model["path"] = str((recipe_dir / os.path.expanduser(model["path"])).resolve())


def references(model: type[BaseModel], raw, where: str) -> Iterator[tuple[str, Reference, str]]:
    """(dotted path, marker, name) of every setting of `raw` (a section's data, valid or not, defaults filled in)
    that names a corpus or a task; sections with `enabled: false` are skipped."""
    if not isinstance(raw, dict) or raw.get("enabled", True) is False:
        return
    for name, field in model.model_fields.items():
        if name in raw:
            value = raw[name]
        elif field.is_required():
            continue
        else:
            value = field.get_default(call_default_factory=True)
            value = value.model_dump() if isinstance(value, BaseModel) else value
        yield from _references_in(field.annotation, field.metadata, value, f"{where}.{name}" if where else name)


def _references_in(annotation, metadata, value, where: str) -> Iterator[tuple[str, Reference, str]]:
    marker = next((m for m in metadata if isinstance(m, Reference)), None)
    if marker is not None:
        if isinstance(value, str) and value not in marker.special:
            yield where, marker, value
        return
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        yield from _references_in(args[0], args[1:], value, where)
    elif origin in (typing.Union, types.UnionType):
        for option in args:
            if option is not type(None):
                yield from _references_in(option, (), value, where)
    elif origin is list and isinstance(value, list):
        for i, item in enumerate(value):
            yield from _references_in(args[0], (), item, f"{where}[{i}]")
    elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield from references(annotation, value, where)


def _reference_problems(raw: dict) -> list[str]:
    """Names that must refer to a declared corpus or task (of the right kind). Checked on the raw data, so they
    join the schema's errors in one report."""
    declared = {section: raw.get(section) if isinstance(raw.get(section), dict) else {}
                for section in ("corpora", "tasks")}
    finetune = (raw.get("stages") or {}).get("finetune") if isinstance(raw.get("stages"), dict) else None
    fine_tuned = finetune.get("task") if isinstance(finetune, dict) and finetune.get("enabled", True) else None
    main_task = declared["tasks"].get(fine_tuned) if isinstance(fine_tuned, str) else None
    missing = {"tasks": [], "corpora": []}
    mismatched = []
    for where, marker, name in references(Recipe, raw, ""):
        entries = declared[marker.section]
        if name not in entries:
            known = ", ".join(sorted(entries)) or "none declared"
            what = "task" if marker.section == "tasks" else "corpus"
            missing[marker.section].append(f"{where}: {name!r} is not a declared {what} (declared: {known}); add it "
                                           f"under {marker.section}: or fix the name")
            continue
        kind = entries[name].get("type") if isinstance(entries[name], dict) else None
        owner = where.split(".")[1] if where.startswith("stages.") else where.split(".")[0]
        if marker.kind is not None and kind != marker.kind:
            mismatched.append(f"{where}: {name!r} is a {kind} task; {owner} works on {marker.kind} tasks")
        if marker.fine_tuned and name != fine_tuned:
            mismatched.append(f"{where}: {name!r} must be the task stages.finetune trains on "
                              f"({fine_tuned or 'fine-tuning is disabled'}): {marker.fine_tuned}")
        if marker.like_fine_tuned and isinstance(main_task, dict) and kind != main_task.get("type"):
            setting = _INDEX.sub("", where)
            mismatched.append(f"{setting}: {name!r} is a {kind} task but the fine-tuned model solves "
                              f"{main_task.get('type')} ({fine_tuned!r}); list tasks of the same type")
    return missing["tasks"] + mismatched + missing["corpora"]


def _describe(error: dict, overridden: set[str]) -> str:
    where = _dotted(error["loc"])
    origin = " (from --set)" if any(k == where or k.startswith(f"{where}.") for k in overridden) else ""
    if error["type"] == "extra_forbidden":
        parent = _section_at(error["loc"][:-1])
        hint = ""
        if parent is not None:
            close = difflib.get_close_matches(str(error["loc"][-1]), list(parent.model_fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; allowed: {', '.join(parent.model_fields)}"
        return f"{where}: unknown key{origin}{hint}"
    if error["type"] == "missing":
        return f"{where}: required but missing"
    if error["loc"] and error["loc"][-1] == "[key]":  # a corpus or task name
        section = _dotted(error["loc"][:-2])
        return (f"{section}: name {error['input']!r} must start with a letter or digit and hold only letters, "
                f"digits, '_' or '-' (at most 64): it names files and S3 keys{origin}")
    value = error.get("input")
    message = error["msg"].removeprefix("Value error, ")
    got = "" if isinstance(value, dict) else f" (got {value!r})"  # a section's own check names its keys itself
    return f"{where or '(top level)'}: {message}{got}{origin}"


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _section_at(loc: tuple) -> type[BaseModel] | None:
    """The schema class that owns the keys at `loc`, for did-you-mean hints."""
    model: type[BaseModel] | None = Recipe
    parts = list(loc)
    while parts and model is not None:
        part = parts.pop(0)
        if model is Recipe and part in ("corpora", "tasks"):
            if not parts:
                return None  # corpus and task names are the user's own
            parts.pop(0)
            model = CorpusConfig if part == "corpora" else TaskDataConfig
            continue
        field = model.model_fields.get(part) if isinstance(part, str) else None
        model = _unwrap_model(field.annotation) if field else None
    return model


def _unwrap_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _unwrap_model(arg)
        if found is not None:
            return found
    return None


def _dedupe(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))
