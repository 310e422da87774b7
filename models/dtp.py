"""Dynamic Token Pooling (Nawrot et al. 2023; spec: shared/reference/boundaries.md §D, §E, §9-10): the DTP
hourglass (``models.common.HourglassLM``: pre layers -> boundary predictor -> mean pooling -> inner layers ->
broadcast -> post layers) with ONE learned boundary predictor (``DTPConfig.routing`` 'single'):

    gumbel  : Gumbel-sigmoid boundaries with a binomial prior α (``DTPConfig.priors`` = (α,));
    entropy : a predictor trained by BCE towards spikes of the model's own next-byte entropy;
    unigram : a predictor trained by BCE towards SentencePiece unigram piece ends (batch['unigram_ends']).

Evaluation rule of Gumbel models: ``DTPConfig.eval_rule`` (see ``HourglassLM``). MAGNET (one predictor per
script or language) is ``models.magnet``; DTP with the whitespace rule is ``models.mean_pooled``.
"""

from __future__ import annotations

from models.common import DTPConfig, HourglassLM


class DTPLM(HourglassLM):
    """The DTP hourglass with one boundary predictor; see the module docstring."""

    def check(self, cfg: DTPConfig) -> None:
        super().check(cfg)
        if cfg.routing != "single" or len(cfg.priors) != 1:
            raise ValueError(f"DTP has one predictor (routing 'single', one prior), got routing {cfg.routing!r} "
                             f"with priors {cfg.priors}; routed predictors are models.MagnetLM")
