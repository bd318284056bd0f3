"""GLUE metric functions against values worked out by hand."""

import math

import pytest

from scale_hyper.evaluation import metrics as M


def test_accuracy_and_f1_by_hand():
    preds = [1, 0, 1, 1, 0, 0]
    labels = [1, 0, 0, 1, 1, 0]
    # tp=2 (idx 0,3), fp=1 (idx 2), fn=1 (idx 4), tn=2
    assert M.accuracy(preds, labels) == pytest.approx(4 / 6)
    assert M.f1(preds, labels) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))  # 0.6667
    assert M.f1([0, 0], [1, 0]) == 0.0  # no predicted positive


def test_mcc_binary_by_hand():
    preds = [1, 0, 1, 1, 0, 0]
    labels = [1, 0, 0, 1, 1, 0]
    tp, tn, fp, fn = 2, 2, 1, 1
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))  # 3/9 = 1/3
    assert M.mcc(preds, labels) == pytest.approx(expected) == pytest.approx(1 / 3)
    assert M.mcc(labels, labels) == pytest.approx(1.0)
    assert M.mcc([1 - y for y in labels], labels) == pytest.approx(-1.0)
    assert M.mcc([1] * 6, labels) == 0.0  # constant predictions: undefined -> 0


def test_mcc_multiclass_by_hand():
    # confusion: c=3 correct of n=4; pred counts {0:2,1:1,2:1}; true counts {0:1,1:2,2:1}
    preds, labels = [0, 0, 1, 2], [0, 1, 1, 2]
    num = 3 * 4 - (2 * 1 + 1 * 2 + 1 * 1)  # 7
    den = math.sqrt((16 - (4 + 1 + 1)) * (16 - (1 + 4 + 1)))  # sqrt(10*10)
    assert M.mcc(preds, labels) == pytest.approx(num / den) == pytest.approx(0.7)


def test_pearson_by_hand():
    x, y = [1, 2, 3, 4], [2, 4, 5, 9]
    # means 2.5, 5; dx = -1.5 -.5 .5 1.5; dy = -3 -1 0 4; sxy = 4.5+.5+0+6 = 11; sxx=5; syy=26
    assert M.pearson(x, y) == pytest.approx(11 / math.sqrt(5 * 26))
    assert M.pearson([1, 1, 1], [1, 2, 3]) == 0.0


def test_spearman_with_ties_by_hand():
    x, y = [10, 20, 20, 40], [1, 3, 2, 4]
    assert M.ranks(x) == [1, 2.5, 2.5, 4]
    # ranks x: 1 2.5 2.5 4 (mean 2.5) ; ranks y: 1 3 2 4 (mean 2.5)
    # dx: -1.5 0 0 1.5 ; dy: -1.5 .5 -.5 1.5 ; sxy = 2.25+0+0+2.25=4.5 ; sxx=4.5 ; syy=5
    assert M.spearman(x, y) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    assert M.spearman([1, 2, 3], [10, 100, 1000]) == pytest.approx(1.0)  # monotone, not linear
    assert M.pearson([1, 2, 3], [10, 100, 1000]) < 0.99


def test_length_mismatch_rejected():
    with pytest.raises(ValueError):
        M.accuracy([1], [1, 0])
