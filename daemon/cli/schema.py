"""`dropq schema manifest|config`: the JSON Schema of a manifest or of config.yaml, for editors.

The schema is generated from the pydantic models that validate the files (ManifestFile, Config), so
an editor checking a file against it agrees with the daemon. With the YAML language server (VS Code's
YAML extension, neovim, Helix, ...) one line at the top of a file is enough:

    # yaml-language-server: $schema=manifest.schema.json
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from pydantic import BaseModel

from dropq.config import Config
from dropq.intake.manifest_file import ManifestFile

#: every keyword pydantic writes for these models is in draft-07, the newest dialect the YAML language
#: server fully supports; `$defs` is reached by its JSON pointer, which any dialect resolves
DIALECT = "http://json-schema.org/draft-07/schema#"
MODELS: dict[str, type[BaseModel]] = {"manifest": ManifestFile, "config": Config}


def json_schema(name: str) -> dict[str, Any]:
    """The JSON Schema of the file `name` ("manifest" or "config")."""
    schema = MODELS[name].model_json_schema()
    return {"$schema": DIALECT, **{k: v for k, v in schema.items() if k != "$schema"}}


def add_parser(sub: Any) -> None:
    """The `schema` subcommand (the CLI calls this with its subparsers)."""
    parser = sub.add_parser(
        "schema", help="print the JSON Schema of a manifest or of config.yaml (for editors)",
        description="Print the JSON Schema of a job manifest or of config.yaml. Save it and name it in the "
                    "file's first line, and editors with a YAML language server complete and check the file "
                    "as it is typed:\n\n  dropq schema manifest > manifest.schema.json\n"
                    "  # yaml-language-server: $schema=manifest.schema.json   (first line of a manifest)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", choices=sorted(MODELS), help="which file's schema")


def run(args: argparse.Namespace) -> int:
    print(json.dumps(json_schema(args.file), indent=2))
    return 0
