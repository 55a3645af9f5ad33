"""Real services the tests run against: Keystone + Glance (openstack.py), as a pytest fixture (fixture.py)."""
