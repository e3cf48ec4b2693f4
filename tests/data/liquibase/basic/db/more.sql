--liquibase formatted sql

--changeset bob:3
insert into item values (2, 'two');

--changeset bob:4 runInTransaction:false
create index item_name on item(name);
