"""The Dockerfile as the check scripts read it (check-dockerfile.sh, check-image-build.sh)."""
import re


def parse(path="Dockerfile"):
    """Returns (stages, instrs, args, problems).

    stages: one {"image", "name"} per FROM (name lower-cased, "" when unnamed; ARGs declared
    before the first FROM substituted in the image); instrs: (stage index, KEYWORD, arguments)
    for every instruction, FROM included (index -1 before the first FROM); args: those ARGs;
    problems: FROM lines that cannot be read. Continuations are joined, comments dropped."""
    lines, cur = [], ""
    for raw in open(path, encoding="utf-8").read().splitlines():
        s = raw.strip()
        if s.startswith("#") or (not s and not cur):
            continue
        if s.endswith("\\"):
            cur += s[:-1] + " "
            continue
        cur += s
        lines.append(cur)
        cur = ""
    stages, instrs, args, problems = [], [], {}, []
    for line in lines:
        kw, _, rest = line.partition(" ")
        kw, rest = kw.upper(), rest.strip()
        if kw == "FROM":
            m = re.match(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?$", rest, re.I)
            if not m:
                problems.append(f"unreadable FROM: {rest}")
                continue
            image = re.sub(r"\$\{?(\w+)\}?", lambda x: args.get(x.group(1), x.group(0)), m.group(1))
            stages.append({"image": image, "name": (m.group(2) or "").lower()})
        elif kw == "ARG" and not stages:
            name, _, val = rest.partition("=")
            args[name.strip()] = val.strip().strip('"')
        instrs.append((len(stages) - 1, kw, rest))
    return stages, instrs, args, problems
