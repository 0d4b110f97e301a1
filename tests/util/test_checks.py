"""The one integer-setting check (featcache.util.checks.check_int) and the messages of its callers."""

from __future__ import annotations

import numpy as np
import pytest

from featcache.util.checks import check_int


@pytest.mark.parametrize("value", [1, 5, np.int64(3), 10])
def test_integers_in_range_pass(value):
    check_int("n", value, 1, 10)


def test_none_passes_only_where_allowed():
    check_int("n", None, 1, allow_none=True)
    with pytest.raises(ValueError, match=r"^n=None is invalid; allowed: an integer >= 1\.$"):
        check_int("n", None, 1)


@pytest.mark.parametrize(("value", "maximum", "message"), [
    (0, None, r"^epochs=0 is invalid; allowed: an integer >= 1\.$"),
    (2.0, None, r"^epochs=2\.0 is invalid; allowed: an integer >= 1\.$"),
    (True, None, r"^epochs=True is invalid; allowed: an integer >= 1\.$"),
    ("3", None, r"^epochs='3' is invalid; allowed: an integer >= 1\.$"),
    (4097, 4096, r"^epochs=4097 is invalid; allowed: an integer >= 1 and <= 4096\.$"),
])
def test_the_message_names_the_setting_the_value_and_what_is_allowed(value, maximum, message):
    with pytest.raises(ValueError, match=message):
        check_int("epochs", value, 1, maximum)


def test_none_allowed_and_hint_with_the_name():
    with pytest.raises(ValueError, match=r"^cv_folds=1 is invalid; allowed: an integer >= 2 or None\. "
                                         r"Hint: set cv_folds in the head's params\.$"):
        check_int("cv_folds", 1, 2, allow_none=True, hint="Hint: set {name} in the head's params.")


def test_callers_keep_their_messages():
    from featcache.finetune.config import FinetuneConfig
    from featcache.heads.validation import resolve_classes

    with pytest.raises(ValueError, match=r"batch_size=0 is invalid; allowed: an integer >= 1 and <= 4096\.$"):
        FinetuneConfig(batch_size=0)
    with pytest.raises(ValueError, match=r"n_classes=1 is invalid; allowed: an integer >= 2 or None\. "
                                         r"Hint: set n_classes in the head's params\.$"):
        resolve_classes(1)


def test_a_bad_setting_is_a_param_error_a_user_error_and_a_value_error():
    """featcache reports it without a traceback (UserError); API and scikit-learn callers catch ValueError."""
    from featcache.errors import ParamError, UserError

    with pytest.raises(ParamError) as err:
        check_int("epochs", "3", 1)
    assert isinstance(err.value, UserError) and isinstance(err.value, ValueError)
