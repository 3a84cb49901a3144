"""The CRDs generated from models.py: committed files match, schemas are structural and
valid for Kubernetes 1.20, every field is described, and the models accept what the CRDs
default."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from agentrun_operator import crdgen, models

ROOT = Path(__file__).resolve().parents[2]
CRDS = {
    "AgentRun": crdgen.agentrun_crd,
    "ToolApproval": crdgen.toolapproval_crd,
}


def walk(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = [(path, node)]
    for name, sub in node.get("properties", {}).items():
        found += walk(sub, f"{path}.{name}")
    if "items" in node:
        found += walk(node["items"], f"{path}[]")
    return found


def root_schema(kind: str) -> dict[str, Any]:
    schema: dict[str, Any] = CRDS[kind]()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def test_committed_crds_match_the_models() -> None:
    assert crdgen.main(["--root", str(ROOT), "--check"]) == 0, "run `make crds` and commit"


def test_the_chart_carries_the_same_crds_as_crds_folder() -> None:
    for path in (ROOT / "crds").glob("*.yaml"):
        assert (ROOT / "charts/agentrun/crds" / path.name).read_text() == path.read_text()


@pytest.mark.parametrize("kind", CRDS)
def test_every_field_has_a_description(kind: str) -> None:
    missing = [
        path
        for path, node in walk(root_schema(kind))
        if not path.endswith("[]")
        and not path.startswith(".metadata")
        and "description" not in node
    ]
    assert missing == []


@pytest.mark.parametrize("kind", CRDS)
def test_schemas_use_only_constructs_kubernetes_1_20_accepts(kind: str) -> None:
    for path, node in walk(root_schema(kind)):
        assert not {"$ref", "anyOf", "oneOf", "allOf", "title", "x-kubernetes-validations"} & set(
            node
        ), path
        assert "type" in node, f"{path} has no type: not a structural schema"
        if node.get("x-kubernetes-preserve-unknown-fields"):
            assert node["type"] == "object", path
        assert node.get("default") != "", f"{path}: 1.20 reads an empty default as null"


def test_spec_defaults_are_what_the_models_default_to() -> None:
    spec = root_schema("AgentRun")["properties"]["spec"]["properties"]
    parsed = models.AgentRunSpec.model_validate({"goal": "x"})
    assert spec["tools"]["default"] == list(models.READ_ONLY_TOOLS) == parsed.tools
    # No default in the CRD (the API server would store it, and a run that leaves the list
    # unset lets AgentPolicy allow rules decide); the operator applies the model's default.
    assert "default" not in spec["approval"]["properties"]["required"]
    assert parsed.approval.required == list(models.MUTATING_TOOLS)
    assert spec["approval"]["properties"]["timeout"]["default"] == parsed.approval.timeout
    assert spec["approval"]["default"] == {}, "so defaults apply when approval is left out"


def test_tool_names_are_valid_openai_function_names() -> None:
    import re

    for name in models.ALL_TOOLS:
        assert re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", name)


def test_printer_columns_match_the_design() -> None:
    columns = CRDS["AgentRun"]()["spec"]["versions"][0]["additionalPrinterColumns"]
    default = [c["name"] for c in columns if not c.get("priority")]
    assert default == ["Phase", "Step", "Approvals", "Tokens", "Cost", "Age"]
    # kubectl get ar -o wide: which worker holds the run.
    assert [c["name"] for c in columns if c.get("priority") == 1] == ["Worker"]
    columns = CRDS["ToolApproval"]()["spec"]["versions"][0]["additionalPrinterColumns"]
    assert [c["name"] for c in columns] == [
        "Run",
        "Tool",
        "State",
        "Decided-By",
        "Votes",
        "Needed",
        "Change",
        "Age",
    ]
    assert [c["name"] for c in columns if c.get("priority") == 1] == ["Change"]


def test_check_mode_reports_drift(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert crdgen.main(["--root", str(tmp_path)]) == 0
    target = tmp_path / "crds" / "agentruns.agentrun.dev.yaml"
    target.write_text(target.read_text().replace("maxLength: 16384", "maxLength: 99"))
    assert crdgen.main(["--root", str(tmp_path), "--check"]) == 1
    assert "make crds" in capsys.readouterr().err


def test_generated_yaml_parses_back_to_the_same_object() -> None:
    crd = crdgen.agentrun_crd()
    assert yaml.safe_load(crdgen.render(crd)) == crd
