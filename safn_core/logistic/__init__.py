"""Exact logistic regression from summed statistics: pooled, federated and under secure
aggregation (`safn_core.logistic.newton`), and its fixed-point layout (`packing`); for K > 2
classes the multinomial (`multinomial`) and ordinal (`ordinal`) fits on the shared K-class
driver (`engine`), chosen and reached through `family`."""

from safn_core.logistic.newton import (PENALTIES, LogisticFit, add_sums, class_weights,
                                       fit_pooled, site_sums, solve)

__all__ = ["PENALTIES", "LogisticFit", "add_sums", "class_weights", "fit_pooled", "site_sums",
           "solve"]
