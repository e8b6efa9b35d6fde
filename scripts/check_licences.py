"""Fail when a runtime dependency of the project is GPL- or AGPL-licensed.

    python scripts/check_licences.py            (part of `make lint`)

The project is Apache-2.0; a copyleft runtime dependency would oblige everyone who ships it to
release their own code under that licence. The runtime dependencies are the installed closure
of the project's `dependencies` (extras such as `dev`, whose test-only oracle cleanlab is
AGPL-3.0, left out), markers evaluated for this interpreter. A distribution's licences are its
`License-Expression` (SPDX), else its licence classifiers, else the first line of `License`; it
is copyleft when every licence it offers is GPL or AGPL (LGPL, and dual licences such as
"Artistic OR GPL", are not). Distributions that state no licence are listed, not failed: their
licence has to be read by a person.
"""

from __future__ import annotations

import re
import sys
from importlib.metadata import PackageNotFoundError, distribution

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PROJECT = "transfer_learning"
# GPL or AGPL, any version, not LGPL: SPDX ids and the classifiers' and free-text spellings.
COPYLEFT = re.compile(
    r"(?<![L\w-])A?GPL|\bGNU (Affero )?General Public License|AGPL", re.IGNORECASE
)
LESSER = re.compile(r"LGPL|Lesser General Public|Library General Public", re.IGNORECASE)


def runtime_closure(project: str = PROJECT) -> dict[str, object]:
    """name → installed distribution, for the project's runtime dependencies and theirs."""
    found: dict[str, object] = {}
    pending = [project]
    while pending:
        name = canonicalize_name(pending.pop())
        if name in found:
            continue
        try:
            found[name] = dist = distribution(name)
        except PackageNotFoundError:
            continue  # not installed for this interpreter (a marker for another platform)
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(requirement.name)
    found.pop(canonicalize_name(project), None)
    return found


def offered_licences(metadata) -> list[str]:
    """The licences a distribution offers, each one a choice."""
    expression = metadata.get("License-Expression")
    if expression:
        return [part.strip(" ()") for part in re.split(r"\bOR\b", expression)]
    classifiers = [
        c.split("::")[-1].strip()
        for c in metadata.get_all("Classifier") or []
        if c.startswith("License ::") and c.strip() != "License :: OSI Approved"
    ]
    if classifiers:
        return classifiers
    text = (metadata.get("License") or "").strip().splitlines()
    if text and text[0].strip().upper() not in ("", "UNKNOWN"):
        return [part.strip(" ()") for part in re.split(r"\bOR\b|/", text[0])]
    return []


def is_copyleft(licences: list[str]) -> bool:
    """Every offered licence GPL or AGPL (LGPL is not)."""
    return bool(licences) and all(
        COPYLEFT.search(licence) and not LESSER.search(licence) for licence in licences
    )


def main() -> int:
    closure = runtime_closure()
    copyleft, unstated = [], []
    for name, dist in sorted(closure.items()):
        licences = offered_licences(dist.metadata)
        if is_copyleft(licences):
            copyleft.append(f"  {name} {dist.version}: {' OR '.join(licences)}")
        elif not licences:
            unstated.append(name)
    if unstated:
        print(f"Licence not stated in the metadata (check by hand): {', '.join(unstated)}")
    if copyleft:
        print(
            "GPL/AGPL-licensed runtime dependencies; the project is Apache-2.0, so move each to a "
            "test-only extra or replace it:\n" + "\n".join(copyleft),
            file=sys.stderr,
        )
        return 1
    print(f"Licences: {len(closure)} runtime dependencies, none GPL/AGPL-only.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
