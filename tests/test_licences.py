"""The licence check of `make lint`: copyleft runtime dependencies fail it, test-only ones do not."""

from __future__ import annotations

import importlib.util
from email.message import Message
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "check_licences.py"
spec = importlib.util.spec_from_file_location("check_licences", SCRIPT)
check_licences = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_licences)


def metadata(**fields: str | list[str]) -> Message:
    message = Message()
    for key, value in fields.items():
        for item in value if isinstance(value, list) else [value]:
            message[key.replace("_", "-")] = item
    return message


@pytest.mark.parametrize(
    ("fields", "copyleft"),
    [
        ({"License_Expression": "GPL-3.0-only"}, True),
        ({"License_Expression": "AGPL-3.0-or-later"}, True),
        ({"License_Expression": "LGPL-2.1-or-later"}, False),
        ({"License_Expression": "MIT OR GPL-2.0-only"}, False),  # a choice
        ({"Classifier": "License :: OSI Approved :: GNU Affero General Public License v3"}, True),
        (
            {
                "Classifier": [
                    "License :: OSI Approved :: Artistic License",
                    "License :: OSI Approved :: GNU General Public License (GPL)",
                ]
            },
            False,
        ),
        (
            {"Classifier": "License :: OSI Approved :: GNU Lesser General Public License v3"},
            False,
        ),
        ({"License": "GPLv3\nfull text follows"}, True),
        ({"License": "BSD-3-Clause"}, False),
        ({"License": "UNKNOWN"}, False),  # unstated: listed for a person, not failed
    ],
)
def test_copyleft_is_every_offered_licence_gpl_or_agpl(fields, copyleft):
    assert (
        check_licences.is_copyleft(check_licences.offered_licences(metadata(**fields))) is copyleft
    )


def test_the_runtime_closure_leaves_test_only_extras_out_and_passes():
    closure = check_licences.runtime_closure()
    assert {"torch", "mlflow", "kedro", "scikit-learn", "numpy"} <= set(closure)
    assert not {"cleanlab", "pytest", "ruff"} & set(closure)  # the dev extra
    assert check_licences.main() == 0
