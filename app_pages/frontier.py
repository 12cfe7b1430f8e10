"""Frontier: privacy spent against utility, per method and model, from completed runs."""

import streamlit as st

from dpstudy import plots
from dpstudy.ui import anchors, chart_block, data_filter, histories, no_runs, runs

st.title("Privacy–utility frontier")
df = runs()
done = data_filter(df[df["status"] == "completed"])
if done[done["method"] != "non_dp"].empty:
    no_runs("No completed DP run yet: the frontier needs at least one.")
    st.stop()

label = st.selectbox("utility metric", list(plots.UTILITY_METRICS), key="metric")
metric = plots.UTILITY_METRICS[label]
st.caption("Completed runs only; validation metrics of the last epoch. ε is B-scan-level: "
           "it bounds what the model reveals about any one training B-scan. Lines: each "
           "method's Pareto front (one dash per method); labelled dashed rules: non-private "
           "runs; dotted grey rule: the ε = 0 anchor, what the public pretraining alone scores "
           "on these runs' validation images. Points of different methods at the same σ or "
           "ε are drawn slightly apart.")
chart_block(plots.frontier_chart(done, metric, anchors=anchors(done, metric)), "frontier")
chart_block(plots.noise_chart(done, metric), "utility_vs_sigma")
private_ids = list(done.loc[done["method"] != "non_dp", "run_id"])
chart_block(plots.epsilon_epochs_chart(histories(private_ids), runs=private_ids),
            "epsilon_vs_epochs")
if done["mia_auc"].notna().any():
    st.caption("Membership-inference audit (`dpstudy audit`): the AUC of a calibrated attack "
               "(each image scored by how much training lowered its loss), members against "
               "held-out images; 0.5 is chance. ε bounds what any attacker learns, the audit "
               "measures what this one does; computed from the private images without noise, "
               "it is a diagnostic, not covered by ε.")
    chart_block(plots.audit_chart(done), "audit_auc")
if done["epsilon_lower_bound"].notna().any():
    st.caption("One-run canary audit: the B-scan-level ε that the audit proves at 95 % "
               "confidence (y) against the ε the accounting claims (x). Points on or below "
               "the claimed-ε line agree with the accounting; runs never audited are absent.")
    chart_block(plots.empirical_epsilon_chart(done), "empirical_epsilon")
