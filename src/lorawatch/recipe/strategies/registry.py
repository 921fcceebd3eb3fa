"""The strategies' registry: each strategy module declares its config class (its settings, defaults and checks)
beside its code and registers the function that builds it; the config's `strategy` section is the union of the
registered classes, told apart by `name`.

This module imports neither torch nor PEFT: the config is built without them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Callable, ClassVar, Union

from pydantic import Discriminator, SerializationInfo, Tag, model_serializer, model_validator

from lorawatch.strict import Strict

if TYPE_CHECKING:
    from lorawatch.recipe.strategies.base import Strategy


class StrategyConfig(Strict):
    """A strategy's settings. Subclasses declare `name: Literal["<name>"] = "<name>"` and their own settings."""

    name: str
    # Trains one adapter per task (their biases could not be shared): the config then needs lora.bias 'none'.
    one_adapter_per_task: ClassVar[bool] = False

    @model_validator(mode="before")
    @classmethod
    def _own_settings_only(cls, data: Any) -> Any:
        # A setting left empty (null) takes the strategy's default, so that config.json, which records every
        # strategy's settings side by side, reads back; a setting of another strategy is refused rather than
        # ignored: it would suggest an effect the run does not have.
        if not isinstance(data, dict):
            return data
        data = {key: value for key, value in data.items() if value is not None or key == "name"}
        own = [key for key in cls.model_fields if key != "name"]
        for key in data:
            if key != "name" and key not in own:
                takes = ", ".join(own) or "no settings"
                raise ValueError(f"'{key}' is not a setting of strategy '{data.get('name', cls.strategy_name())}' "
                                 f"(it takes {takes})")
        return data

    @model_serializer(mode="wrap")
    def _as_recorded(self, handler, info: SerializationInfo) -> dict:
        # Recorded as one flat section with every registered strategy's settings (null where not this strategy's),
        # as config.json has held it since strategies were added: old run folders compare and resume byte for byte.
        own = handler(self)
        keys = [key for key in setting_names() if key in own or not info.exclude_none]
        return {"name": own["name"], **{key: own.get(key) for key in keys}}

    @classmethod
    def strategy_name(cls) -> str:
        return cls.model_fields["name"].default


Builder = Callable[..., "Strategy"]  # (config, train_rows, *, pad_id, device) -> Strategy


@dataclass(frozen=True)
class Registered:
    config: type[StrategyConfig]
    build: Builder


# By name, in registration order (which is the order config.json lists the settings in).
STRATEGIES: dict[str, Registered] = {}


def register(config: type[StrategyConfig]) -> Callable[[Builder], Builder]:
    """Decorates the function that builds the strategy `config` configures."""
    def decorator(build: Builder) -> Builder:
        STRATEGIES[config.strategy_name()] = Registered(config, build)
        return build
    return decorator


def setting_names() -> list[str]:
    """Every registered strategy's settings, in registration order, each once."""
    return list(dict.fromkeys(key for entry in STRATEGIES.values() for key in entry.config.model_fields
                              if key != "name"))


def _name_of(value: Any) -> str | None:
    # A section without a name is the plain protocol, as before the section had other strategies.
    return value.get("name", "none") if isinstance(value, dict) else getattr(value, "name", None)


def config_union() -> Any:
    """The config's `strategy` field: the registered config classes, told apart by `name`."""
    members = tuple(Annotated[entry.config, Tag(name)] for name, entry in STRATEGIES.items())
    return Annotated[Union[members], Discriminator(_name_of)]
