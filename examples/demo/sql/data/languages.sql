INSERT INTO language (name) VALUES ('English'), ('Italian'), ('Japanese'), ('French');
