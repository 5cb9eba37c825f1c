"""The limits every ranking route enforces (`/answer`, `/v2/rerank`, `/rerank`): one question, so many passages."""

from collections.abc import Sequence

from app.services.errors import ApiError
from app.settings import Settings


def check_limits(question: tuple[str, str], passages: tuple[str, Sequence[str]], settings: Settings) -> None:
    """422 naming the field when the question or the passages are empty or break the configured limits.

    `question` and `passages` are (field name, value): errors name the field as the caller's API calls it.
    """
    (question_field, text), (passages_field, texts) = question, passages
    if not text:
        raise ApiError(422, "empty", f"{question_field}: must not be empty", question_field)
    if len(text) > settings.max_question_chars:
        raise ApiError(
            422, "too_long", f"{question_field}: longer than {settings.max_question_chars} characters", question_field
        )
    if not texts:
        raise ApiError(422, "empty", f"{passages_field}: must hold at least one passage", passages_field)
    if len(texts) > settings.max_passages:
        raise ApiError(
            422, "too_many_passages", f"{passages_field}: more than {settings.max_passages} passages", passages_field
        )
    for i, passage in enumerate(texts):
        if len(passage) > settings.max_passage_chars:
            field = f"{passages_field}.{i}"
            raise ApiError(422, "too_long", f"{field}: longer than {settings.max_passage_chars} characters", field)
