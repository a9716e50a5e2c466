-- scopemeter schema: the meter's accuracy class (percent, e.g. 1 for IEC 62053-21 class 1, 0.5 for
-- class 0.5S), from which statements state the measurement uncertainty of their figures (issue 14).
ALTER TABLE meters ADD COLUMN accuracy_class double precision CHECK (accuracy_class > 0);
