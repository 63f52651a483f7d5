"""A structural check of docker/Dockerfile in Python, shared by the docker and Kubernetes unit tests.

The image is built and run for real only by `make image-test` (it needs a Docker engine and minutes); this
check runs in `make test` and says which rule a change breaks. `dockerfile_problems` lists the rules.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import re
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCKER = os.path.join(REPO, "docker")
DOCKERFILE = os.path.join(DOCKER, "Dockerfile")
BASE_ARG = "BASE_IMAGE"
BASE_DEFAULT = "debian:bookworm-slim"
STAGED = "build/image/"  # what scripts/image.sh stages for the build; generated, so not required to exist


@dataclasses.dataclass
class Instruction:
    keyword: str
    args: str
    line: int
    stage: int = 0  # index of the FROM this instruction belongs to

    def exec_form(self) -> Optional[list[str]]:
        """The JSON (exec) form's argument list, or None for the shell form."""
        text = self.args.split(" CMD ", 1)[1].strip() if self.keyword == "HEALTHCHECK" else self.args
        return json.loads(text) if text.startswith("[") else None


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with their first line number; continuation lines joined, comments dropped (as Docker does)."""
    instructions: list[Instruction] = []
    buffer, start, stage = "", 0, -1
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue  # also inside a continuation: Docker drops comment and empty lines there
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer += stripped[:-1].rstrip() + " "
            continue
        keyword, _, args = (buffer + stripped).partition(" ")
        stage += keyword.upper() == "FROM"
        instructions.append(Instruction(keyword.upper(), args.strip(), start, max(stage, 0)))
        buffer = ""
    return instructions


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    last = max((i.stage for i in instructions), default=0)
    return [i for i in instructions if i.stage == last]


def arg_defaults(instructions: list[Instruction]) -> dict[str, str]:
    return dict(i.args.split("=", 1) for i in instructions if i.keyword == "ARG" and "=" in i.args)


def expand(value: str, defaults: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: defaults.get(m.group(1), m.group(0)), value)


def copies(instructions: list[Instruction]) -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY from the build context; --from=<stage> copies left out."""
    result = []
    for i in instructions:
        if i.keyword == "COPY" and "--from=" not in i.args:
            parts = [p for p in (i.exec_form() or i.args.split()) if not p.startswith("--")]
            result.append((parts[:-1], parts[-1]))
    return result


def copied_to(instructions: list[Instruction], source: str) -> Optional[str]:
    """Where the image holds `source` (a path in the build context), or None if nothing copies it."""
    for sources, dest in copies(instructions):
        if source in sources:
            if source.endswith("/"):
                return dest.rstrip("/")
            return dest.rstrip("/") + "/" + os.path.basename(source) if dest.endswith("/") else dest
    return None


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Approximates Docker's rule: the last pattern matching the path or one of its parents wins."""
    parents = [path] + [path.rsplit("/", n)[0] for n in range(1, path.count("/") + 1)]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        if any(fnmatch.fnmatchcase(p, pattern.lstrip("!")) for p in parents):
            excluded = not negated
    return excluded


def read_dockerignore(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


def _base_problems(instructions: list[Instruction]) -> list[str]:
    """ARG BASE_IMAGE=debian:bookworm-slim before the first FROM; the final stage on that same base."""
    froms = [i for i in instructions if i.keyword == "FROM"]
    if not froms:
        return ["no FROM"]
    first = froms[0].args.split()
    problems = []
    earlier = [i for i in instructions[: instructions.index(froms[0])] if i.keyword == "ARG"]
    if first[0] not in (f"${{{BASE_ARG}}}", f"${BASE_ARG}") or not any(
            i.args == f"{BASE_ARG}={BASE_DEFAULT}" for i in earlier):
        problems.append(f"FROM {first[0]}: expected FROM ${{{BASE_ARG}}} with ARG {BASE_ARG}={BASE_DEFAULT} "
                        "before FROM")
    base_stage = first[2] if len(first) == 3 and first[1].upper() == "AS" else None
    if len(froms) > 1 and froms[-1].args.split()[0] != base_stage:
        problems.append(f"the final stage must start FROM {base_stage} (the base stage with Java and Python), "
                        f"not {froms[-1].args}")
    return problems


def _stack_problems(instructions: list[Instruction]) -> list[str]:
    """Java 17 from Debian; the venv installed offline from the wheelhouse, constrained to the venv's freeze;
    the wheelhouse copied into a build stage only, never into the final image."""
    runs = " ".join(i.args for i in instructions if i.keyword == "RUN")
    problems = []
    if "openjdk-17-jre-headless" not in runs:
        problems.append("Java 17 (openjdk-17-jre-headless) must be installed from the base's packages")
    # each `pip install ...` command up to the next && or ; (one RUN may hold several)
    pip = [m.group(1) for i in instructions if i.keyword == "RUN" for m in re.finditer(r"pip install([^;&]*)", i.args)]
    # offline, and either constrained to the venv's freeze or a single wheel without its dependencies
    if not pip or not all(re.search(r"--no-index\b", a) and (("--find-links" in a and re.search(r"\s-c\s", a))
                                                             or "--no-deps" in a) for a in pip):
        problems.append("every pip install must be offline (--no-index --find-links) and constrained (-c)")
    final = final_stage(instructions)
    for sources, _ in copies(final):
        if any(s.startswith(STAGED + "wheels") for s in sources):
            problems.append("the wheelhouse must not be copied into the final stage (it would stay in the image)")
    return problems


def _user_problems(instructions: list[Instruction], defaults: dict[str, str]) -> list[str]:
    """The final stage's last USER (the one the container runs as, wherever CMD stands) is non-root."""
    if not any(i.keyword in ("CMD", "ENTRYPOINT") for i in instructions):
        return ["no CMD or ENTRYPOINT"]
    users = [expand(i.args, defaults) for i in final_stage(instructions) if i.keyword == "USER"]
    if not users:
        return ["no USER in the final stage (the image would run as root)"]
    if users[-1].split(":")[0] in ("root", "0"):
        return [f"USER {users[-1]}: the server must not run as root"]
    return []


def _port_and_health_problems(instructions: list[Instruction]) -> list[str]:
    problems = []
    exposed = {p.split("/")[0] for i in instructions if i.keyword == "EXPOSE" for p in i.args.split()}
    if not {"8080", "8081", "8082"} <= exposed:
        problems.append(f"EXPOSE must list 8080 8081 8082, got {sorted(exposed)}")
    checks = [i for i in instructions if i.keyword == "HEALTHCHECK"]
    if not checks or " CMD " not in f" {checks[-1].args} ":
        problems.append("HEALTHCHECK ... CMD ... is missing")
    else:
        command = checks[-1].exec_form() or []
        script = next((c for c in command if c.endswith(".py")), None)
        if script is None or copied_to(instructions, "docker/" + os.path.basename(script)) != script:
            problems.append(f"HEALTHCHECK runs {command}, not a script the Dockerfile copies in")
    return problems


def _state_problems(instructions: list[Instruction]) -> list[str]:
    """The server's working folder (key_file.json, logs) is a VOLUME, and the logs go there too."""
    final = final_stage(instructions)
    workdirs = [i.args for i in final if i.keyword == "WORKDIR"]
    volumes = [v for i in final if i.keyword == "VOLUME" for v in (i.exec_form() or i.args.split())]
    if not workdirs or workdirs[-1] not in volumes:
        return [f"the last WORKDIR ({workdirs[-1] if workdirs else None}) must be a VOLUME, got {volumes}"]
    env = " ".join(i.args for i in final if i.keyword == "ENV")
    if f"LOG_LOCATION={workdirs[-1]}/" not in env:
        return [f"ENV LOG_LOCATION must be under the state volume {workdirs[-1]}"]
    return []


def _serve_problems(instructions: list[Instruction]) -> list[str]:
    """Model store and config copied in; TorchServe started in the foreground with exactly those paths."""
    problems = []
    config = copied_to(instructions, STAGED + "config/config.properties")
    metrics = copied_to(instructions, STAGED + "config/metrics.yaml")
    store = copied_to(instructions, STAGED + "model-store/")
    if not (config and metrics and store):
        problems.append(f"COPY of {STAGED}model-store/, {STAGED}config/config.properties and metrics.yaml needed")
    entry = next((i.exec_form() for i in reversed(instructions) if i.keyword == "ENTRYPOINT"), None) or []
    cmd = next((i.exec_form() for i in reversed(instructions) if i.keyword == "CMD"), None) or []
    command = entry + cmd
    if not command or "torchserve" not in command:
        return problems + ["CMD/ENTRYPOINT (exec form) must start torchserve"]
    args = command[command.index("torchserve") + 1:]
    for flag in ("--start", "--foreground", "--ncs"):
        if flag not in args:
            problems.append(f"torchserve needs {flag}")
    given = dict(zip(args, args[1:]))
    if given.get("--ts-config") != config or given.get("--model-store") != store:
        problems.append(f"torchserve --ts-config/--model-store must be the copied {config} and {store}, got {args}")
    wrapper = next((c for c in entry if c.endswith(".py")), None)
    if wrapper and copied_to(instructions, "docker/" + os.path.basename(wrapper)) != wrapper:
        problems.append(f"ENTRYPOINT runs {wrapper}, which the Dockerfile does not copy in")
    return problems


def _context_problems(instructions: list[Instruction]) -> list[str]:
    """Every COPY source is let through by .dockerignore and, unless staged by `make image`, exists."""
    patterns = read_dockerignore(os.path.join(REPO, ".dockerignore"))
    problems = []
    for sources, _ in copies(instructions):
        for source in sources:
            if source.endswith("/"):
                let_through = any(p.startswith("!" + source) for p in patterns)
            else:
                let_through = not dockerignore_excludes(patterns, source.replace("*", "x"))
            if not let_through:
                problems.append(f"COPY {source}: excluded by .dockerignore")
            if not source.startswith(STAGED) and not os.path.exists(os.path.join(REPO, source)):
                problems.append(f"COPY {source}: no such file in the build context")
    return problems


def dockerfile_problems(text: str) -> list[str]:
    """Structural check of docker/Dockerfile; an empty list means it passes. The rules:

    1. `ARG BASE_IMAGE=debian:bookworm-slim` before the first `FROM ${BASE_IMAGE} AS <base>`; the final stage
       starts FROM <base>;
    2. Java 17 from the base's packages; every pip install offline and constrained (the venv's freeze); the
       wheelhouse never copied into the final stage;
    3. the final stage's last USER is not root (ARG defaults expanded);
    4. EXPOSE 8080 8081 8082; a HEALTHCHECK whose CMD runs a script the Dockerfile copies in;
    5. the final WORKDIR (where TorchServe writes key_file.json) is a VOLUME, and LOG_LOCATION is inside it;
    6. COPY of the staged model store and config, and TorchServe started with --start --foreground --ncs
       --ts-config <copied config> --model-store <copied store>;
    7. every COPY source is let through by .dockerignore, and exists unless `make image` stages it.
    """
    instructions = parse_dockerfile(text)
    defaults = arg_defaults(instructions)
    return (_base_problems(instructions) + _stack_problems(instructions) + _user_problems(instructions, defaults)
            + _port_and_health_problems(instructions) + _state_problems(instructions)
            + _serve_problems(instructions) + _context_problems(instructions))


def dockerfile_text() -> str:
    with open(DOCKERFILE, encoding="utf-8") as f:
        return f.read()
