"""Small real training sets for tests that upload or train (not a test module: no test_ prefix)."""

import csv
import io

from training import deduplicate, load_sms_spam


def sms_csv(num_per_class: int = 15) -> bytes:
    """A balanced, duplicate-free CSV of real SMS texts."""
    rows = deduplicate(load_sms_spam())
    picked = [e for e in rows if e.label == "ham"][:num_per_class]
    picked += [e for e in rows if e.label == "spam"][:num_per_class]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["text", "label"])
    writer.writerows([e.text, e.label] for e in picked)
    return out.getvalue().encode()
