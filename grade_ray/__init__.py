"""grade_ray: GRADE personalized multi-task fusion, trained on Ray."""

__version__ = "0.1.0"
