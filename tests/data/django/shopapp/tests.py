"""Each run must see the recipe's state: its row, and no row an earlier run committed."""

from django.db import connection
from django.test import SimpleTestCase, TestCase

from shopapp.models import Item

MARK = "committed by a run"


class RecipeRowsTest(TestCase):
    def test_recipe_row_and_rollback(self) -> None:
        self.assertEqual(list(Item.objects.values_list("name", flat=True)), ["from recipe"])
        Item.objects.create(name="rolled back")
        self.assertEqual(Item.objects.count(), 2)


class FreshRunTest(SimpleTestCase):
    """Not wrapped in a transaction: what it writes stays in the test database."""

    databases = {"default"}  # noqa: RUF012 - Django reads class attributes

    def test_no_rows_from_earlier_runs(self) -> None:
        names = sorted(Item.objects.values_list("name", flat=True))
        self.assertEqual(names, ["from recipe"])
        Item.objects.create(name=f"{MARK} in {connection.settings_dict['NAME']}")
        print(f"database used: {connection.settings_dict['NAME']}")
