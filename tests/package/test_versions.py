"""One version, one set of dependency versions (fast: part of `make test`).

- debian/changelog's top entry is harmonicd/__init__.py's __version__
  (scripts/build-deb.sh refuses to build otherwise; this says it earlier);
- requirements.lock pins every runtime dependency in pyproject.toml and theirs,
  each within pyproject's range;
- the environment the tests run in has exactly the pinned versions, so the
  package's private environment (built from the lock) is what was tested.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import tomllib

from tests.package.conftest import REPO, current_version

LOCK = REPO / "requirements.lock"


def _name(requirement: str) -> str:
    return re.split(r"[ ;<>=!~\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def lock_pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for raw in LOCK.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9._-]+)==([A-Za-z0-9.+!-]+)", line)
        assert m, f"requirements.lock: not NAME==VERSION: {raw!r}"
        pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def test_changelog_names_the_package_version() -> None:
    first = (REPO / "debian" / "changelog").read_text().splitlines()[0]
    m = re.match(r"harmonicd \(([^)]+)\) ", first)
    assert m, f"debian/changelog: first line is not an entry: {first!r}"
    assert m.group(1) == current_version(), (
        f"debian/changelog says {m.group(1)}, harmonicd/__init__.py says {current_version()}: "
        f"add a changelog entry (dch -v {current_version()})")


def test_lock_pins_every_runtime_dependency_within_its_range() -> None:
    from packaging.requirements import Requirement

    pins = lock_pins()
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        req = Requirement(dep)
        name = _name(dep)
        assert name in pins, f"requirements.lock does not pin {name} (pyproject.toml needs {dep})"
        assert req.specifier.contains(pins[name]), f"requirements.lock: {name}=={pins[name]} is outside {dep}"


def test_lock_is_closed_under_the_dependencies_of_what_it_pins() -> None:
    from packaging.requirements import Requirement

    pins = lock_pins()
    for name in pins:
        for raw in md.distribution(name).requires or []:
            req = Requirement(raw)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            dep = _name(raw)
            assert dep in pins, f"requirements.lock pins {name}, which needs {raw}, but not {dep}"
            assert req.specifier.contains(pins[dep], prereleases=True), \
                f"requirements.lock: {dep}=={pins[dep]} does not satisfy {name}'s {raw}"


def test_tests_run_with_the_pinned_versions() -> None:
    wrong = {name: (want, md.version(name)) for name, want in lock_pins().items() if md.version(name) != want}
    assert not wrong, ("this environment differs from requirements.lock (rebuild it: rm -rf .venv && make venv): "
                       + ", ".join(f"{n} {have} (lock {want})" for n, (want, have) in wrong.items()))
