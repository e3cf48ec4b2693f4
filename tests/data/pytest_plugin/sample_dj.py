"""A sample pytest-django project's tests: the test database is the recipe's state."""

import pytest
from django.db import connection, transaction
from shopapp.models import Item


@pytest.mark.django_db
def test_sees_recipe_row_and_writes():
    assert connection.settings_dict["NAME"].startswith("shop:pytest-")
    assert list(Item.objects.values_list("name", flat=True)) == ["from recipe"]
    Item.objects.create(name="written by a test")


@pytest.mark.django_db
def test_rolled_back_between_tests():
    assert list(Item.objects.values_list("name", flat=True)) == ["from recipe"]
    Item.objects.create(name="written again")


@pytest.mark.django_db(transaction=True)
def test_transactional_test_commits():
    with transaction.atomic():
        Item.objects.create(name="committed")
    assert Item.objects.filter(name="committed").count() == 1
