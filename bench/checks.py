"""The benchmarks' verdict table: each measure, its value and target, and the exit status."""


def report(checks: list[tuple[str, float, str, bool]], width: int = 34, digits: int = 2) -> int:
    """Print ``(measure, value, target, met)`` rows; 0 when every target is met, else 1."""
    print(f"{'measure':<{width}} {'value':>9}  {'target':<8} result")
    for name, value, target, ok in checks:
        print(f"{name:<{width}} {value:>9.{digits}f}  {target:<8} {'ok' if ok else 'MISSED'}")
    return 0 if all(ok for *_, ok in checks) else 1
