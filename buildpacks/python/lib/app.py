"""What the python buildpack needs to know of an app, asked of the build image's own Python.

    python3 app.py pipfile-requirements PIPFILE_LOCK OUT   the "default" packages as
                                                           requirements lines
    python3 app.py project-name PYPROJECT                  the project's distribution name
    python3 app.py wsgi                                    MODULE:VARIABLE of a WSGI app in
                                                           the working directory, if one is found
"""

import json
import os
import re
import sys


def fail(message):
    sys.stderr.write(message + "\n")
    sys.exit(1)


def pipfile_requirements(lock_path, out_path):
    try:
        with open(lock_path, encoding="utf-8") as f:
            lock = json.load(f)
    except (OSError, ValueError) as e:
        fail(f"{lock_path}: {e}")
    default = lock.get("default")
    if not isinstance(default, dict):
        fail(f'{lock_path}: no "default" section')
    lines = []
    for name, spec in sorted(default.items()):
        if not isinstance(spec, dict):
            fail(f"{lock_path}: default.{name} is not an object")
        extras = spec.get("extras") or []
        line = name + (f"[{','.join(extras)}]" if extras else "")
        if "version" in spec:
            line += spec["version"]
        elif "git" in spec:
            ref = f"@{spec['ref']}" if "ref" in spec else ""
            line = f"{line} @ git+{spec['git']}{ref}"
        elif "path" in spec or "file" in spec:
            line = spec.get("path") or spec.get("file")
        if spec.get("markers"):
            line += f"; {spec['markers']}"
        lines.append(line)
    with open(out_path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def project_name(pyproject):
    import tomllib

    try:
        with open(pyproject, "rb") as f:
            doc = tomllib.load(f)
    except (OSError, ValueError) as e:
        fail(f"{pyproject}: {e}")
    name = doc.get("project", {}).get("name") or doc.get("tool", {}).get("poetry", {}).get("name")
    print(name or "")


# `app = Flask(...)`, `application = get_wsgi_application()` and the like, at the top level.
ASSIGNMENT = re.compile(r"^(app|application)\s*(:[^=]*)?=", re.MULTILINE)


def wsgi():
    candidates = ["app.py", "wsgi.py", "main.py", "application.py", "server.py"]
    # A Django project keeps its WSGI module one level down.
    for entry in sorted(os.listdir(".")):
        if os.path.isfile(os.path.join(entry, "wsgi.py")):
            candidates.append(os.path.join(entry, "wsgi.py"))
    for path in candidates:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError):
            continue
        found = ASSIGNMENT.search(text)
        if found:
            module = path[: -len(".py")].replace(os.sep, ".")
            if not all(part.isidentifier() for part in module.split(".")):
                continue
            print(f"{module}:{found.group(1)}")
            return


def main():
    args = sys.argv[1:]
    if args[:1] == ["pipfile-requirements"] and len(args) == 3:
        pipfile_requirements(args[1], args[2])
    elif args[:1] == ["project-name"] and len(args) == 2:
        project_name(args[1])
    elif args == ["wsgi"]:
        wsgi()
    else:
        fail("usage: app.py pipfile-requirements|project-name|wsgi ...")


main()
