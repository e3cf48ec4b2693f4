"""Reading a config file: YAML to the validated model, relative paths resolved, references checked.

Apart from `config` (the schema) so that the checks, which need the schema, can run here
without the schema importing them back.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from pydantic import ValidationError

from taidon_proxy.config import (
    AlembicPrepare,
    CommandPrepare,
    Config,
    DjangoPrepare,
    PsqlPrepare,
    Recipe,
    TlsConfig,
)
from taidon_proxy.config_checks import check as check_refs
from taidon_proxy.config_errors import Problem, config_error, from_validation, line_of
from taidon_proxy.config_profiles import PROFILE_ENV, apply_profile, file_keys, interpolate
from taidon_proxy.errors import ConfigError


def find_config_path(explicit: Path | None) -> Path:
    if explicit is not None:
        return explicit
    env = os.environ.get("TAIDON_CONFIG")
    return Path(env) if env else Path("taidon.yaml")


def load_config(path: Path, *, check: bool = True) -> Config:
    """Read, validate and resolve a config file; every error names the key and the line."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from e
    return parse_config(text, source=path, check=check)


def parse_config(
    text: str, *, source: Path, check: bool = True, profile: str | None = None
) -> Config:
    """Validate a config's text; with `check`, also what it refers to (files, changelogs, roles).

    `${NAME}` references are expanded first, then the profile (`profile`, else
    $TAIDON_PROFILE) is merged over the rest. Every problem is reported with the file, the
    line and the key path.
    """
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{source}:{where}: invalid YAML: {getattr(e, 'problem', e)}") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of settings")
    wanted = profile or os.environ.get(PROFILE_ENV)
    secret_keys = file_keys(data, wanted)
    data = interpolate(data, source=source, node=node)
    data, chosen = apply_profile(data, wanted, source=source, node=node)
    try:
        cfg = Config.model_validate({**data, "profile": chosen, "file_values": secret_keys})
    except ValidationError as e:
        raise config_error(source, from_validation(e.errors(), Config, node)) from None
    cfg = _resolve(cfg, source.resolve().parent, source)
    if check:
        problems = [Problem(p.key, p.message, line_of(node, p.key)) for p in check_refs(cfg)]
        if problems:
            raise config_error(source, problems)
    return cfg


def _resolve(cfg: Config, base: Path, source: Path) -> Config:
    def rel(p: Path) -> Path:
        p = p.expanduser()
        return p if p.is_absolute() else (base / p)

    dbs: dict[str, Recipe] = {}
    for alias, r in cfg.databases.items():
        prep = r.prepare
        if isinstance(prep, PsqlPrepare):
            prep = prep.model_copy(update={"files": [rel(f) for f in prep.files]})
        elif isinstance(prep, CommandPrepare):
            pass  # inputs stay globs; they expand against the recipe's base directory
        elif isinstance(prep, AlembicPrepare | DjangoPrepare):
            # Every file such a recipe names (config, lock, manage, python) is a Path field.
            paths: dict[str, Path | list[Path]] = {
                k: rel(v) for k, v in prep if isinstance(v, Path)
            }
            if isinstance(prep, DjangoPrepare):
                paths["pythonpath"] = [rel(p) for p in prep.pythonpath]
            prep = prep.model_copy(update=paths)
        else:
            prep = prep.model_copy(update={"search_path": [rel(p) for p in prep.search_path]})
        dbs[alias] = r.model_copy(update={"prepare": prep})
    tls = cfg.tls
    if tls.cert is not None and tls.key is not None:
        tls = TlsConfig(cert=rel(tls.cert), key=rel(tls.key))
    return cfg.model_copy(
        update={"store": rel(cfg.store), "databases": dbs, "tls": tls, "source": source}
    )
