"""KuaiRand-Pure (Gao et al., CIKM 2022, CC BY-SA 4.0): ``convert`` (raw logs ->
sessions), ``upstream`` (the multi-task model that scores later days) and
``pipeline`` (``grade-ray kuairand``: convert, train GRADE and baselines, paired
replay evaluation, results text)."""
