"""Pydantic model of the ``controls`` config section (:class:`margin.controls.Controls`).

Unknown keys are errors, so a typo is reported with the key's name; ``volmargin.config.RunConfig`` composes
this model with the other stages' sections.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from margin.controls import Controls

__all__ = ["ControlsConfig"]


class ControlsConfig(BaseModel):
    """Controls applied to every deployable policy (:class:`margin.controls.Controls`).

    Parameters
    ----------
    floor, ceiling : float
        Bounds of the IM rate (fractions of notional).
    max_change : float
        Largest relative IM change per update (0.25 = 25%).
    notice_bars : int
        Bars before an MM increase binds on open positions (new positions get the higher IM at once).
    mm_fraction : float
        MM = mm_fraction × IM.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    floor: float = Field(default=0.02, gt=0, le=1)
    ceiling: float = Field(default=0.5, gt=0, le=1)
    max_change: float = Field(default=0.5, gt=0)
    notice_bars: int = Field(default=1, ge=0)
    mm_fraction: float = Field(default=0.5, gt=0, le=1)

    @model_validator(mode="after")
    def _check(self) -> ControlsConfig:
        if self.floor > self.ceiling:
            raise ValueError(f"controls.floor ({self.floor}) must be <= controls.ceiling ({self.ceiling})")
        return self

    def build(self) -> Controls:
        """The :class:`Controls` these settings describe."""
        return Controls(**self.model_dump())
