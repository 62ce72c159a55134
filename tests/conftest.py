"""Shared pytest configuration."""


# ---- native kernels: which ISA variants actually ran (tests/test_kernels*.py) ----------------
def pytest_terminal_summary(terminalreporter):
    """One line saying which kernel variants were tested here and which were skipped (and why)."""
    import re

    tally: dict[str, dict[str, int]] = {}
    reasons: dict[str, str] = {}
    native: list[str] = []
    for status in ("passed", "failed", "skipped"):
        for rep in terminalreporter.stats.get(status, []):
            nodeid = getattr(rep, "nodeid", "")
            if "test_kernels" not in nodeid:
                continue
            for key, value in getattr(rep, "user_properties", []):
                if key == "native_isas" and rep.when == "call":
                    native.append(value)
            m = re.search(r"isa-([a-z0-9_]+)", nodeid)
            if not m or (status != "skipped" and rep.when != "call"):
                continue
            tally.setdefault(m.group(1), {}).setdefault(status, 0)
            tally[m.group(1)][status] += 1
            if status == "skipped" and isinstance(rep.longrepr, tuple):
                reasons[m.group(1)] = str(rep.longrepr[2]).replace("Skipped: ", "")
    if not tally and not native:
        return
    ran = [f"{isa} ({', '.join(f'{n} {s}' for s, n in t.items())})" for isa, t in tally.items() if set(t) - {"skipped"}]
    skipped = [f"{isa}: {reasons.get(isa, 'skipped')}" for isa, t in tally.items() if set(t) == {"skipped"}]
    terminalreporter.write_sep("-", "bitllm kernel variants")
    terminalreporter.write_line("tested: " + ("; ".join(ran) or "none"))
    if skipped:
        terminalreporter.write_line("NOT tested (skipped): " + "; ".join(skipped))
    for line in native:
        terminalreporter.write_line("native C++ test ran: " + line)
