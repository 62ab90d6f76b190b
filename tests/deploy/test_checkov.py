"""checkov's Kubernetes checks on the manifest: every failed check is one k8s/checkov-accepted.yaml lists, with its
reason, for the resources it names; a listed failure that no longer happens must leave the list.

checkov runs from its own venv (`make test` and `make test-fast` make .venv-checkov; CHECKOV=<path> points
elsewhere). In CI (`make test` installs it) a missing checkov is a failure, not a skip."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "k8s" / "ray-service.gpu.yaml"
ACCEPTED = ROOT / "k8s" / "checkov-accepted.yaml"


def checkov() -> str:
    for candidate in (os.environ.get("CHECKOV"), str(ROOT / ".venv-checkov" / "bin" / "checkov"),
                      shutil.which("checkov")):
        if candidate and Path(candidate).is_file():
            return candidate
    if os.environ.get("CI"):
        pytest.fail("checkov is not installed: `make test` installs it in .venv-checkov")
    pytest.skip("checkov is not installed: `make test` installs it in .venv-checkov")


@pytest.fixture(scope="module")
def report() -> dict:
    command = [checkov(), "-f", str(MANIFEST), "--framework", "kubernetes", "-o", "json", "--quiet", "--compact",
               "--skip-download"]  # no internet: checkov's guideline download would only warn
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert run.stdout.strip(), run.stderr[-3000:]
    data = json.loads(run.stdout)
    return data[0] if isinstance(data, list) else data


def test_checkov_parsed_every_object(report):
    documents = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    assert report["summary"]["parsing_errors"] == 0
    assert report["summary"]["resource_count"] >= len(documents)  # it counts a Deployment's pod template too
    assert report["summary"]["passed"] > 0


def test_every_failed_check_is_accepted_with_a_reason(report):
    accepted = yaml.safe_load(ACCEPTED.read_text())
    assert all(entry["reason"].strip() and entry["resources"] for entry in accepted.values())
    failed = {(c["check_id"], c["resource"]) for c in report["results"]["failed_checks"]}
    allowed = {(check, resource) for check, entry in accepted.items() for resource in entry["resources"]}
    assert failed - allowed == set(), "failed checks not accepted in k8s/checkov-accepted.yaml"
    assert allowed - failed == set(), "accepted failures that no longer fail: remove them from the list"
