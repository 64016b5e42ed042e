"""Schedules as plain data: Schedule, the baselines, the exact DP over any pair cost, the analytic trajectory,
strategies. Imports models/ and storage/."""
